"""Warm-up on rank 0: every shape class the engine can produce (runner/warmup.py lists them and holds the
budget arithmetic) runs once through the engine's own step -- broadcast, forward, pick, feed -- before the
rank reports ready, so that no request after `/health` turns 200 meets a compilation or an autotune. The
followers run its plans like any other. It ends with a `reset` plan that zeroes every slot, and sets the
scheduler's prefill budget per step from the step times it measured (limits.max_gap_steps).
"""
from __future__ import annotations

import base64
import io
import statistics
import time

from ..kernels.decode_attention import MAX_QUERY_TOKENS
from ..plan import FROM_DEVICE, Prefill, StepPlan
from ..runner.warmup import _fit, _text_ids, gap_bound_reachable, prefill_budget, timed_chunks
from .sequence import RequestError


def _image_request(side_w: int, side_h: int, temperature: float = 0.0) -> dict:
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((side_w, side_h), 64).convert("RGB").save(buf, format="PNG")
    return {"messages": [{"role": "user", "content": [
        {"type": "image", "data_b64": base64.b64encode(buf.getvalue()).decode()},
        {"type": "text", "text": "warm-up"}]}], "max_tokens": 1, "temperature": temperature,
        "top_p": 0.9, "top_k": 20, "seed": 0, "chat_template_kwargs": {}}


class WarmUp:
    """Runs the warm-up plans through `engine` (rank 0), logging progress; `engine.warmup` shows it."""

    def __init__(self, engine, log):
        self.engine, self.runner, self.log = engine, engine.runner, log
        self.limits = engine.limits
        self.step = 0
        self.timings: dict[str, float] = {}
        # Slot 0's KV blocks for every warm-up prompt: the pool's first, as many as one sequence can hold (the
        # planner made the pool hold at least one request of the deployment's limits).
        state = self.runner.state
        self.blocks = list(range(1, 1 + min(state.blocks_per_seq, state.num_blocks - 1)))

    def run_plan(self, plan, pixels=None, seqs=None) -> float:
        """One plan through the engine's own step (broadcast, forward, pick, feed), waited for."""
        t0 = time.perf_counter()
        self.engine.launch(plan, pixels or {}, seqs).wait()
        return time.perf_counter() - t0

    def prompt(self, n_first: int, n_next: int | None = None) -> list[float]:
        """A text prompt of n_first (+ n_next) tokens in slot 0: a first chunk, then a continuing one;
        the seconds each chunk took."""
        ids = _text_ids(self.runner.config, n_first + (n_next or 0))
        bounds = [(0, n_first)] + ([(n_first, n_first + n_next)] if n_next else [])
        return [self.chunk(ids, None, start, end) for start, end in bounds]

    def chunk(self, ids: list[int], seq, start: int, end: int) -> float:
        """Prompt tokens [start, end) of `ids` in slot 0 (`seq`: an image request's prepared sequence,
        whose pixels go with its first chunk and whose sampling picks its token)."""
        first_image = start == 0 and seq is not None and seq.pixel_values is not None
        item = Prefill(0, ids, seq.image_grid_thw if first_image else [],
                       tuple(seq.pixel_values.shape) if first_image else None, start, end,
                       blocks=self.blocks if start == 0 else None)
        return self.run_plan(StepPlan(prefill=[item]), {0: seq.pixel_values} if first_image else None,
                             {0: seq} if seq is not None else None)

    def mixed_step(self, n: int) -> float:
        """A text chunk of n tokens in slot 0 with every other slot decoding, one forward: its seconds."""
        plan = StepPlan(prefill=[Prefill(0, _text_ids(self.runner.config, n), [], None, 0, n, blocks=self.blocks)],
                        decode=[(s, FROM_DEVICE) for s in range(1, self.runner.max_slots)])
        return self.run_plan(plan)

    def stage(self, what: str, fn, total: int):
        self.step += 1
        self.engine.warmup = f"{self.step}/{total} {what}"
        t0 = time.perf_counter()
        out = fn()
        self.log(f"[rank 0] warm-up {self.step}/{total}: {what} ({time.perf_counter() - t0:.2f} s)")
        return out

    def __call__(self) -> int:
        engine, runner, limits = self.engine, self.runner, self.limits
        t_start = time.perf_counter()
        longest = engine.intake.prompt_limit()
        cap = min(limits.prefill_chunk_tokens, longest)
        x16 = max(16, cap // 16 * 16)
        # On a GPU each class runs at its largest length: the largest is also the peak of the prefill's
        # workspace, met here rather than by a request. On CPU (nothing is autotuned, memory is elastic)
        # the smallest, which keeps a CPU demo's start-up short.
        largest = runner.device.type == "cuda"
        cont = max(16, min(x16, (longest - 16) // 16 * 16)) if largest else 16  # continuing chunks start at 16
        stages = []
        # A first chunk of 1 token happens too: a new prompt gets what is left of a step's budget.
        first, covered = [], set()
        for n in (range(cap, 0, -1) if largest else range(1, cap + 1)):
            classes = runner.chunk_classes(0, n)
            if not classes <= covered:
                first.append(n)
                covered |= classes
        for n in first:
            stages.append((f"prefill, first chunk of {n}", lambda n=n: self.prompt(n)))

        for n in (cont, cont - 1, *range(MAX_QUERY_TOKENS, 0, -1)):
            stages.append((f"prefill, continuing chunk of {n}", lambda n=n: self.prompt(16, n)))
        if limits.max_images_per_request > 0:
            stages.append(("vision tower, smallest image", lambda: self.image(small=True, budget=cap)))
            if largest:
                stages.append(("vision tower, largest image within the limits",
                               lambda: self.image(small=False, budget=cap)))
        for b in reversed(runner.batch_sizes):
            plan = StepPlan(decode=[(s, FROM_DEVICE) for s in range(b)])
            stages.append((f"decode batch {b}", lambda plan=plan: [self.run_plan(plan) for _ in range(2)]))
        graphs = getattr(runner, "prefill_graphs", None)
        mixed = graphs.mixed if graphs is not None else []  # none with one slot (ModelRunner)
        for t in mixed:  # a chunk with the decode rows in one forward (runner/prefill_graphs.py)
            stages.append((f"prefill chunk of {t} with the decode rows", lambda t=t: self.mixed_step(t)))
        total = len(stages) + 2
        for what, fn in stages:
            self.stage(what, fn, total)

        def timing():
            full = StepPlan(decode=[(s, FROM_DEVICE) for s in range(runner.max_slots)])
            decode_s = statistics.median(self.run_plan(full) for _ in range(5))
            prefill_s = {n: min(self.prompt(n)[0] for _ in range(2)) for n in timed_chunks(x16, graphed, largest)}
            # what a gap-bound step costs when its chunk rides in the decode forward (only the budget reads it)
            mixed_s = {n: min(self.mixed_step(n) for _ in range(2)) for n in timed_chunks(x16, mixed[-1], largest)} \
                if mixed and limits.max_gap_steps else {}
            return decode_s, prefill_s, mixed_s

        # Prefill graphs (runner/prefill_graphs.py): the chunks timed, and those cut while a stream decodes,
        # stay within the largest graph, so that the budget's line fit is one path's and a gap-bound chunk a
        # replay. On one H200 (27B widths, 4 layers, 2026-12-02) 64 tokens as a replay and 2,048 eagerly
        # fitted a 506-token fixed cost, and prefill steps took 10-20 ms beside a 3.6 ms decode step.
        graphed = runner.prefill_graphs.buckets[-1] if getattr(runner, "prefill_graphs", None) else None
        decode_s, prefill_s, mixed_s = self.stage("timing a decode step and prefill chunks", timing, total)
        budget_cap = min(cap, graphed) if graphed and limits.max_gap_steps else cap
        if mixed_s:  # a gap-bound chunk rides in the decode forward: its cost beyond a decode step
            step_s = {n: max(t - decode_s, 1e-6) for n, t in mixed_s.items()}
            budget, overhead = prefill_budget(decode_s, step_s, limits.max_gap_steps, min(budget_cap, mixed[-1]),
                                              sizes=mixed, alone_s=prefill_s)
        else:
            step_s = prefill_s
            budget, overhead = prefill_budget(decode_s, prefill_s, limits.max_gap_steps, budget_cap,
                                              sizes=runner.prefill_graphs.buckets if graphed else None)
        engine.scheduler.prefill_budget, engine.scheduler.prefill_overhead = budget, overhead
        if not gap_bound_reachable(decode_s, step_s, limits.max_gap_steps):
            self.log(f"[rank 0] warm-up: a prefill forward's fixed cost ({_fit(step_s)[1] * 1e3:.1f} ms) alone "
                     f"exceeds limits.max_gap_steps = {limits.max_gap_steps:g} decode steps of "
                     f"{decode_s * 1e3:.2f} ms: gaps while prompts are prefilled will be longer; chunks of "
                     f"{budget} tokens keep that cost from multiplying")
        self.stage("reset every slot", lambda: self.run_plan(StepPlan(reset=True)), total)
        self.timings = {"decode_step_s": decode_s, **{f"prefill_{n}_s": t for n, t in prefill_s.items()},
                        **{f"mixed_{n}_s": t for n, t in mixed_s.items()},
                        "prefill_budget": budget, "warmup_s": time.perf_counter() - t_start}
        self.log(f"[rank 0] warm-up done in {self.timings['warmup_s']:.1f} s: decode step "
                 f"{decode_s * 1e3:.2f} ms at batch {runner.max_slots}, prefill "
                 + ", ".join(f"{n} tokens {t * 1e3:.1f} ms" for n, t in prefill_s.items())
                 + "".join(f", {n} tokens with the decode rows {t * 1e3:.1f} ms" for n, t in mixed_s.items())
                 + f"; prefill budget {budget} tokens per step (+{overhead} per further prompt)"
                 + (f" (limits.max_gap_steps = {limits.max_gap_steps:g})" if limits.max_gap_steps else ""))
        return budget

    def image(self, small: bool, budget: int) -> None:
        """An image prompt through the engine's own processing (Intake.prepare), prefilled in chunks of
        `budget` as the scheduler would; the largest one the limits accept, when not `small`."""
        vision = self.runner.model.config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size  # pixels per side of one merged image token
        limits = self.limits
        if small:
            side = [unit, unit]
        else:
            tokens = self.engine.intake.prompt_limit() - 64
            per_side = max(1, int(tokens ** 0.5))
            while per_side * per_side * unit * unit > limits.max_image_pixels and per_side > 1:
                per_side -= 1
            side = [per_side * unit, per_side * unit]
        for _ in range(16):
            try:
                seq = self.engine.intake.prepare(_image_request(*side, temperature=0.0 if small else 0.7))
                break
            except RequestError:  # the processor's own resize made it too long: a bit smaller
                side = [max(unit, int(s * 0.9)) for s in side]
        else:
            raise RuntimeError(f"warm-up: no image prompt fits the limits (last tried {side})")
        seq.slot = 0
        for start in range(0, len(seq.input_ids), budget):
            self.chunk(seq.input_ids, seq, start, min(len(seq.input_ids), start + budget))


def warm_up(engine, log) -> int:
    """Run the warm-up on rank 0 (the followers run its plans); sets and returns the prefill budget per step."""
    return WarmUp(engine, log)()
