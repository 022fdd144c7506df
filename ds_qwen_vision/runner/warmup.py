"""Warm-up: every shape class the engine can produce runs once before the rank reports ready, so that
no request after `/health` turns 200 meets a compilation or an autotune.

What compiles or tunes on first use, and what it is keyed on (hence the classes below):
- the compiled RMSNorms (kernels/norms.py, `dynamic=True`): dynamo specialises sizes 0 and 1, so a
  prefill of 1 token and one of several, a decode batch of 1 and one of several, are different graphs;
- Triton kernels (FLA's Gated DeltaNet chunk kernels, inductor's): Triton specialises every integer
  argument on `== 1` and `% 16 == 0`, and the sequence length is one; FLA's chunk kernels' autotune
  keys are head counts and dims (fixed for a deployment) and its chunk size, but its L2 norm of q and
  k (`use_qk_l2norm_in_kernel`) runs over rows = tokens x key heads and keys its autotune (and a
  constexpr) on NB = ceil(rows / 2048): one variant per bucket of 2048 / heads tokens (the 27B's 16 key
  heads at tp=1: every 128 tokens);
- decode batch sizes: one CUDA graph each (captured at start) and their first replays;
- SDPA (flash for a first chunk, memory-efficient with a mask for a continuing one), cuBLAS, the
  vision tower's conv and attention: nothing compiles, but each kernel's first launch loads it; the
  vision tower runs eagerly for any grid, so a smallest and a largest image (the largest the limits
  let through, which is also the prefill's peak memory) cover it.
So a prefill chunk of n tokens has the classes (first or continuing, length 1 / a multiple of 16 /
other) and, for this rank's GDN key heads h, (h, ceil(n h / 2048), the class of n h): finite whatever
lengths the scheduler cuts (~20 chunks for the 27B). Warm-up runs each at its largest length. The runner
records the classes it meets (`ModelRunner.shapes`); a test serves varied requests after warm-up and
checks that none is new. On CUDA the runner also counts Triton compilations after ready
(`compiles_after_ready` in /health's rank reports): the check on the GPU that this list is complete.

Warm-up runs as ordinary plans broadcast by rank 0 (followers run them like any other), sampling
included, and ends with a `reset` plan that zeroes every slot, so nothing of it leaks into requests.
It also times a decode step and prefill chunks, from which `limits.max_gap_steps` sets the prefill
budget per step (`prefill_budget`).
"""
from __future__ import annotations

import base64
import io
import statistics
import time

# ---- shape classes (recorded by the runner) -----------------------------------------------------------


def length_class(n: int) -> str:
    return "1" if n == 1 else "x16" if n % 16 == 0 else "other"


def prefill_classes(start: int, n: int, heads: tuple[int, ...] = ()) -> set[tuple]:
    """The classes of a prefill chunk of n tokens from `start`; `heads`: this rank's GDN key head counts.
    A continuing chunk of at most MAX_QUERY_TOKENS tokens runs the decode attention kernel, whose token
    count is a compile-time constant: one class per length."""
    from ..kernels.decode_attention import MAX_QUERY_TOKENS

    short = start > 0 and n <= MAX_QUERY_TOKENS
    return {("prefill", "continue" if start > 0 else "first", f"q{n}" if short else length_class(n))} | \
        {("rows", h, -(-n * h // 2048), length_class(n * h)) for h in heads}


def decode_class(batch: int) -> tuple:
    return ("decode", batch)


def vision_class(grids: list[list[int]]) -> tuple:
    return ("vision",)  # eager for every grid: one class (see the module docstring)


# ---- the budget from measured step times ----------------------------------------------------------------


# The budget aims at this share of the gap allowance: the bound is checked against step times measured
# later and elsewhere (a served burst), which spread by a few percent (the 16-row step measured 17.9-18.8 ms
# over three runs on one H200, 2026-12-02), and the chunk cost is a line through two measured sizes.
GAP_MARGIN = 0.9


def prefill_budget(decode_s: float, prefill_s: dict[int, float], max_gap_steps: float | None,
                   cap: int, floor: int = 16, sizes: list[int] | None = None,
                   alone_s: dict[int, float] | None = None) -> tuple[int, int]:
    """(tokens, overhead): prompt tokens per step such that a step with a prefill chunk and the full
    decode batch takes at most `max_gap_steps` decode steps -- decode + a + b * n <= GAP_MARGIN *
    max_gap_steps * decode, where a + b * n is the fitted time of a chunk of n tokens -- a multiple of 16
    (the chunks' own Triton class and the smallest prefill graph) within [floor, cap]; and the fixed cost a
    of each further prefill forward in the same step, in tokens (a / b), which the scheduler charges
    against the budget too, so that two prompts' chunks in one step stay within the bound. (cap, 0) when
    max_gap_steps is None. `sizes`: the prefill graphs' chunk sizes, where a chunk runs padded up to the next
    one: a gap-bound budget is then one of them (a 144-token chunk would cost a 256-token replay).
    `alone_s`: where the step's first chunk rides in the decode forward (runner/prefill_graphs.py, mixed),
    `prefill_s` is what such a step costs beyond the decode step, and a further prompt's chunk runs on its
    own: its fixed cost comes from these times of chunks run alone.

    Where the bound is out of reach -- a prefill forward's fixed cost alone is over the allowance (a
    host-bound prefill, measured on an H200: a 64-token chunk 15.9 ms, a 2048-token one 25.9 ms, beside a
    4.3 ms decode step) -- no chunk meets it, and small chunks would only multiply that fixed cost (16
    prompts served at a fifth of the runner's rate): then a chunk is no smaller than its fixed cost in
    tokens (a / b, rounded up to 16), so a prefill step costs at most twice its fixed part, and
    `gap_bound_reachable` below says so. Where the bound is in reach it is kept, even when that makes the
    chunks small: the knob trades prefill rate for the gap, and a step's cost is what it promises."""
    if max_gap_steps is None or len(prefill_s) < 2:
        return cap, 0
    per_token, fixed = _fit(prefill_s)
    overhead = int((_fit(alone_s)[1] if alone_s and len(alone_s) > 1 else fixed) / per_token)
    n = (GAP_MARGIN * max_gap_steps * decode_s - decode_s - fixed) / per_token
    if n < floor:  # out of reach: chunks that amortize their own fixed cost
        n = -(-int(fixed / per_token) // 16) * 16
    elif sizes:
        n = max((t for t in sizes if t <= n), default=floor)
    return int(min(cap, max(floor, n // 16 * 16))), overhead


def timed_chunks(cap16: int, graphed: int | None, largest: bool) -> list[int]:
    """The two chunk sizes warm-up times for the budget's fit: a small one and the largest chunk
    (`cap16`, a multiple of 16), both within the largest prefill graph (`graphed`) where there are graphs;
    on CPU (`largest` False) at most 256, to keep the start-up short."""
    top = min(cap16, graphed) if graphed else cap16
    if not largest:
        top = min(top, 256)
    small = min(64, top)
    if small == top and top > 16:
        small = 16
    return sorted({small, top})


def _fit(prefill_s: dict[int, float]) -> tuple[float, float]:
    """(seconds per token, fixed seconds) of a prefill chunk, through the smallest and largest measured."""
    (n0, t0), (n1, t1) = min(prefill_s.items()), max(prefill_s.items())
    per_token = max((t1 - t0) / (n1 - n0), 1e-9)
    return per_token, max(t0 - per_token * n0, 0.0)


def gap_bound_reachable(decode_s: float, prefill_s: dict[int, float], max_gap_steps: float | None,
                        floor: int = 16) -> bool:
    """Whether a prefill chunk of `floor` tokens keeps a step within max_gap_steps decode steps (with
    prefill_budget's margin)."""
    if max_gap_steps is None or len(prefill_s) < 2:
        return True
    per_token, fixed = _fit(prefill_s)
    return decode_s + fixed + per_token * floor <= GAP_MARGIN * max_gap_steps * decode_s


# ---- warm-up --------------------------------------------------------------------------------------------


def _text_ids(config, n: int) -> list[int]:
    """n ordinary token ids (no image / video / vision-boundary ids, which get_rope_index looks for)."""
    special = {getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id")}
    ids = [i for i in range(100, 400) if i not in special]
    return [ids[i % len(ids)] for i in range(n)]


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
        from ..plan import Prefill, StepPlan

        first_image = start == 0 and seq is not None and seq.pixel_values is not None
        item = Prefill(0, ids, seq.image_grid_thw if first_image else [],
                       tuple(seq.pixel_values.shape) if first_image else None, start, end,
                       blocks=self.blocks if start == 0 else None)
        return self.run_plan(StepPlan(prefill=[item]), {0: seq.pixel_values} if first_image else None,
                             {0: seq} if seq is not None else None)

    def mixed_step(self, n: int) -> float:
        """A text chunk of n tokens in slot 0 with every other slot decoding, one forward: its seconds."""
        from ..plan import FROM_DEVICE, Prefill, StepPlan

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
        from ..plan import FROM_DEVICE, StepPlan

        engine, runner, limits = self.engine, self.runner, self.limits
        t_start = time.perf_counter()
        longest = min(limits.max_prompt_tokens or engine.context_len, engine.context_len - 1)
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
        from ..kernels.decode_attention import MAX_QUERY_TOKENS

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
        engine.prefill_budget, engine.prefill_overhead = budget, overhead
        if not gap_bound_reachable(decode_s, step_s, limits.max_gap_steps):
            self.log(f"[rank 0] warm-up: a prefill forward's fixed cost ({_fit(step_s)[1] * 1e3:.1f} ms) alone "
                     f"exceeds limits.max_gap_steps = {limits.max_gap_steps:g} decode steps of "
                     f"{decode_s * 1e3:.2f} ms: gaps while prompts are prefilled will be longer; chunks of "
                     f"{budget} tokens keep that cost from multiplying")
        self.stage("reset every slot", lambda: self.run_plan(StepPlan(reset=True)), total)
        runner.warm_shapes = set(runner.shapes)
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
        """An image prompt through the engine's own processing (Engine.prepare), prefilled in chunks of
        `budget` as the scheduler would; the largest one the limits accept, when not `small`."""
        from ..engine.engine import RequestError

        unit = self.engine.image_unit()  # pixels per side of one merged image token
        limits = self.limits
        if small:
            side = [unit, unit]
        else:
            tokens = min(limits.max_prompt_tokens or self.engine.context_len, self.engine.context_len - 1) - 64
            per_side = max(1, int(tokens ** 0.5))
            while per_side * per_side * unit * unit > limits.max_image_pixels and per_side > 1:
                per_side -= 1
            side = [per_side * unit, per_side * unit]
        for _ in range(16):
            try:
                seq = self.engine.prepare(_image_request(*side, temperature=0.0 if small else 0.7))
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
