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

This module holds the classes and the budget arithmetic; warm-up itself runs on rank 0's engine
(engine/warmup.py) as ordinary plans broadcast to every rank, sampling included, and ends with a `reset`
plan that zeroes every slot, so nothing of it leaks into requests. It also times a decode step and
prefill chunks, from which `limits.max_gap_steps` sets the prefill budget per step (`prefill_budget`).
"""
from __future__ import annotations


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


# ---- warm-up's prompts -------------------------------------------------------------------------------------


def _text_ids(config, n: int) -> list[int]:
    """n ordinary token ids (no image / video / vision-boundary ids, which get_rope_index looks for)."""
    special = {getattr(config, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                  "vision_end_token_id")}
    ids = [i for i in range(100, 400) if i not in special]
    return [ids[i % len(ids)] for i in range(n)]
