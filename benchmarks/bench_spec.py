"""Speculative decoding benchmark: one process, tp=1, random weights, through the server's own runner and
the engine's own acceptance code (engine/speculative.py).

    # one H200, Qwen3.6-27B shapes, bf16 (about 8 minutes with the baseline's compile):
    python benchmarks/bench_spec.py --preset 27b --device cuda
    # any machine, the tiny preset (checks the script end to end; its figures mean nothing):
    python benchmarks/bench_spec.py --preset tiny --device cpu --tokens 16 --no-write

Measured in the same call, after a 512-token prompt (tiny: 64), one stream:
- the plain 1-token decode step (ms per token);
- the cost of a verify step over 2 and 4 positions (k = 1, 3), accept included, against the plain step;
- the cost of an MTP draft step (the head's k drafts for one row);
- effective ms per output token at forced acceptance profiles: the drafter is handed the target's own
  greedy continuation and each draft is right with the profile's probability (0%; 88/77/66% at positions
  1/2/3; 100%), k = 3, the engine's acceptance (and its stop-drafting rule) applied;
- ngram prompt lookup on a repetitive workload (a paragraph repeated 4 times), with its measured acceptance;
- MTP at the same forced profiles: the head drafts and its step is timed as served, each verify's acceptance
  decided by the profile (forced_outcome: the accepted drafts are the head's own, so the run stays consistent);
- MTP at k = 3 end to end (its acceptance on random weights is meaningless: labelled);
- the MTP step and forced profiles again with the head drafting over --draft-vocab ids (mtp.DraftHead), same run;
- transformers' generate with its static cache + torch.compile on the same card (skip with --no-baseline).
Acceptance-dependent figures from random weights are labelled `random weights` in the results. Writes
benchmarks/results/DATE-CARD-tp1-spec.json (rows with run, decode_ms_per_token, floor_ms, ...).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_qwen_vision.checkpoint import make_config  # noqa: E402
from bench_27b import randomize  # noqa: E402  (the same random weights as the decode benchmark)

PROFILES = {"forced 0%": (0.0,), "forced 88/77/66%": (0.88, 0.77 / 0.88, 0.66 / 0.77), "forced 100%": (1.0,)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


class Oracle:
    """Forced acceptance: drafts from the target's own greedy continuation, each right with the profile's
    probability (conditional on the earlier ones), otherwise a wrong token. Plugged in as the n-gram index."""

    def __init__(self, n_prompt: int, continuation: list[int], profile, vocab: int, seed: int = 0):
        self.tokens, self.n_prompt, self.cont, self.profile = [0] * n_prompt, n_prompt, continuation, profile
        self.rng, self.vocab = random.Random(seed), vocab

    def extend(self, tokens):
        self.tokens.extend(tokens)

    def draft(self, k):
        g = len(self.tokens) - self.n_prompt
        out = []
        for i, true in enumerate(self.cont[g:g + k]):
            p = self.profile[min(i, len(self.profile) - 1)]
            out.append(true if self.rng.random() < p else (true + 1) % self.vocab)
        return out


def forced_outcome(drafts: list[int], row: torch.Tensor, profile, rng: random.Random) -> list[int]:
    """A verify's outcome at a forced profile, for drafts the runner made itself (MTP): the first a drafts are
    accepted, each with the profile's probability given the earlier ones, then the target's token at position a.
    The tokens stay consistent with the forward (the state after position a is the one for drafts[:a]), so
    the steps that follow are the served ones; the text is not greedy (random weights: it means nothing)."""
    a = 0
    while a < len(drafts) and rng.random() < profile[min(a, len(profile) - 1)]:
        a += 1
    return drafts[:a] + [int(torch.argmax(row[a]))]


def generate(runner, prompt: list[int], n: int, index=None, device=None, force=None):
    """One stream the way the engine runs it (plan -> run -> acceptance); returns (tokens, seconds, stats).
    force: a profile (PROFILES) that decides each verify's acceptance instead of the target's argmax (MTP)."""
    from prometheus_client import CollectorRegistry

    from ds_qwen_vision.engine.sampling import Sampling
    from ds_qwen_vision.engine.speculative import Speculator
    from ds_qwen_vision.plan import Prefill, StepPlan

    rng = random.Random(0)
    seq = type("Seq", (), {})()
    seq.slot, seq.input_ids, seq.sampling, seq.generator = 0, prompt, Sampling(max_tokens=n, temperature=0), None
    seq.generated, seq.next_token = 0, None
    seq.in_flight, seq.fed = 0, False  # every step here is read before the next plan (the engine's hold)
    spec = None
    if runner.spec is not None:
        spec = Speculator(runner.spec.method, runner.spec.k, CollectorRegistry())
        spec.start(seq)
        if index is not None:
            seq.spec.index = index
    logits = runner.run(StepPlan(prefill=[Prefill(0, prompt)]))
    out = [int(torch.argmax(logits[0]))]
    seq.generated, seq.next_token = 1, out[0]
    sync(device)
    t0 = time.perf_counter()
    steps = 0
    while seq.generated < n:
        plan = StepPlan()
        if spec is not None:
            spec.schedule(plan, seq)
        else:
            plan.decode.append((0, seq.next_token))
        row = runner.run(plan)[0]
        steps += 1
        seq.in_flight = 0  # read at once, as Engine.accept does
        tokens = None
        if plan.verify:
            drafts = spec.drafts(seq, runner.verified[0])
            if drafts and force is not None:
                tokens = spec.record(seq, forced_outcome(drafts, row, force, rng), drafts)
            elif drafts:
                tokens = spec.tokens(seq, row, drafts)
            else:
                seq.spec.accept, row = 0, row[0]
        if tokens is None:
            tokens = [int(torch.argmax(row))]
        for token in tokens[:n - seq.generated]:
            out.append(token)
            seq.generated += 1
            seq.next_token = token
    sync(device)
    seconds = time.perf_counter() - t0
    stats = {"steps": steps}
    if spec is not None:
        drafted, accepted = spec.m_drafts._value.get(), spec.m_accepted._value.get()
        stats.update(drafts=drafted, accepted=accepted, acceptance=accepted / drafted if drafted else None,
                     tokens_per_step=(n - 1) / steps)
        per_pos = {}
        for metric in spec.m_pos_drafts.collect()[0].samples:
            if metric.name.endswith("_total"):
                per_pos[metric.labels["position"]] = [metric.value, 0]
        for metric in spec.m_pos_accepted.collect()[0].samples:
            if metric.name.endswith("_total"):
                per_pos[metric.labels["position"]][1] = metric.value
        stats["acceptance_per_position"] = {p: a / d for p, (d, a) in sorted(per_pos.items()) if d}
    return out, seconds, stats


@torch.inference_mode()
def gdn_paths_agree(model, device) -> dict:
    """kernels/gdn_step.py's CUDA backend (Triton) against its reference path, one layer, T = 4 verify from a
    random state: the largest differences of the output and of the states after each position."""
    from ds_qwen_vision.kernels import gdn as kernel
    from ds_qwen_vision.kernels import gdn_step

    layer = next(l.linear_attn for l in model.model.language_model.layers if hasattr(l, "linear_attn"))
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(2, 4, layer.hidden_size, generator=g, device=device, dtype=torch.bfloat16)
    conv = torch.randn(2, layer.conv_dim, layer.conv_kernel_size, generator=g, device=device, dtype=torch.bfloat16)
    rec = 0.1 * torch.randn(2, layer.num_v_heads, layer.head_k_dim, layer.head_v_dim, generator=g, device=device)

    def run(backend):
        gdn_step.BACKEND = backend
        try:
            conv_st = torch.zeros(2, 4, *conv.shape[1:], dtype=conv.dtype, device=device)
            rec_st = torch.zeros(2, 4, *rec.shape[1:], device=device)
            return kernel.gdn_multi_token(layer, h, conv, rec, conv_steps=conv_st, rec_steps=rec_st), rec_st
        finally:
            gdn_step.BACKEND = None

    (out, states), (ref, ref_states) = run(gdn_step.backend_for(h)), run("torch")
    return {"run": "check: GDN multi-token forward, CUDA path vs reference path (one layer, T=4)",
            "backend": gdn_step.backend_for(h), "decode_ms_per_token": None,
            "max_abs_diff_out": float((out.float() - ref.float()).abs().max()),
            "max_abs_out": float(ref.float().abs().max()),
            "max_abs_diff_states": float((states - ref_states).abs().max())}


@torch.inference_mode()
def first_step_agreement(runner, prompt: list[int], continuation: list[int]) -> dict:
    """The first step after the prompt two ways: the plain 1-token step's logits and a 4-position verify's
    logits at its first position (the same token, the same context). Their difference against the plain
    logits' top-2 gap says whether a first-step divergence is a rounding near-tie or a fault."""
    from ds_qwen_vision.plan import Prefill, StepPlan

    plain = runner()
    plain.run(StepPlan(prefill=[Prefill(0, prompt)]))
    a = plain.run(StepPlan(decode=[(0, continuation[0])]))[0].float().reshape(-1)
    del plain
    spec = runner("ngram", 3)
    spec.run(StepPlan(prefill=[Prefill(0, prompt)]))
    b = spec.run(StepPlan(verify=[(0, continuation[:4])]))[0].float()[0]
    del spec
    top = torch.topk(a, 2).values
    return {"run": "check: first step, plain 1-token logits vs 4-position verify at position 0",
            "decode_ms_per_token": None, "max_abs_diff_logits": float((a - b).abs().max()),
            "logits_std": float(a.std()), "plain_top2_gap": float(top[0] - top[1]),
            "plain_argmax": int(a.argmax()), "verify_argmax": int(b.argmax()),
            "plain_argmax_rank_in_verify": int((b > b[a.argmax()]).sum())}


def same_prefix(out: list[int], plain: list[int]) -> int:
    """How many leading tokens equal plain decoding's. In fp32 all of them (the CPU tests); in bf16 a verify's
    [k+1]-row GEMMs round differently from the 1-row step's, so a near tie can flip a random-weight argmax."""
    n = 0
    for a, b in zip(out, plain):
        if a != b:
            break
        n += 1
    return n


def timed_steps(runner, plan_fn, repeats: int, device) -> float:
    """Median seconds of runner.run(plan_fn()) (host read of the result included, as the engine reads it)."""
    from ds_qwen_vision.plan import StepPlan  # noqa: F401

    times = []
    for _ in range(repeats + 3):
        plan = plan_fn()
        sync(device)
        t = time.perf_counter()
        out = runner.run(plan)
        int(torch.argmax(out[0].reshape(-1)))
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[3:])


def baseline_static(config, device, dtype, prompt, n) -> dict:
    """transformers' generate with its static cache (+ torch.compile on CUDA), same shapes, random weights."""
    from transformers import Qwen3_5ForConditionalGeneration
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Qwen3_5ForConditionalGeneration(config).eval()
    torch.set_default_dtype(default)
    randomize(model, seed=0)
    ids = torch.tensor([prompt], device=device)
    kwargs = {"do_sample": False, "pad_token_id": 0, "max_new_tokens": n + 1, "min_new_tokens": n + 1,
              "cache_implementation": "static"}

    def gen():
        clock = Clock()
        with torch.inference_mode():
            model.generate(ids, streamer=clock, **kwargs)
        t = clock.times[2:]
        return [b - a for a, b in zip(t, t[1:])]

    gen()  # warm-up (compiles on CUDA)
    steps = gen() + gen()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"run": "transformers generate, static cache" + (" + torch.compile" if device.type == "cuda" else ""),
            "decode_ms_per_token": 1e3 * statistics.median(steps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="27b", choices=["27b", "tiny", "loadtest"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tokens", type=int, default=96, help="output tokens per end-to-end run")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; tiny 64)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--draft-vocab", type=int, default=32768,
                   help="the MTP rows again with the head drafting over this many ids (speculative.draft_vocab); 0: not")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-write", action="store_true", help="print the results only")
    p.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()

    from ds_qwen_vision.engine.speculative import NgramIndex
    from ds_qwen_vision.model import build_sharded, init_distributed
    from ds_qwen_vision.plan import Prefill, StepPlan
    from ds_qwen_vision.runner import ModelRunner

    init_distributed(args.device)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if args.device == "cuda" else torch.float32
    config = make_config(args.preset)
    vocab = config.text_config.vocab_size
    n_prompt = args.prompt or (64 if args.preset == "tiny" else 512)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, min(1200, vocab), (n_prompt,), generator=g).tolist()
    paragraph = prompt[:n_prompt // 4]
    repetitive = paragraph * 4  # an "edit / summarise this" workload: the answer repeats the prompt
    max_len = n_prompt + args.tokens + 64

    model = build_sharded(config, 1, dtype, mtp=True)
    randomize(model, seed=0)
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("mtp."))
    bw = copy_bandwidth(device)
    floor_ms = 1e3 * weights / bw if bw else None
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = []
    label = "random weights: acceptance (and so this figure) depends on content"
    date = datetime.datetime.now(datetime.timezone.utc)
    name = card.replace("NVIDIA ", "").replace(" ", "-")
    out_path = args.results_dir / f"{date:%Y-%m-%d}-{name}-tp1-spec.json"

    def write(partial: bool) -> None:
        # written after every row: a run cut short by a time limit still leaves what it measured
        result = {"date": date.isoformat(timespec="seconds"), "card": card, "command": " ".join(["python"] + sys.argv),
                  "tp": 1, "preset": args.preset, "dtype": str(dtype).removeprefix("torch."),
                  "prompt_tokens": n_prompt, "output_tokens": args.tokens, "partial": partial, "rows": rows}
        text = json.dumps(result, indent=1)
        if not partial:
            print(text)
        if not args.no_write:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(text + "\n")

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(partial=True)

    @contextlib.contextmanager
    def guarded(what: str):
        # one failing part (a first run of a CUDA-only path) must not cost the rest of the call's figures
        try:
            yield
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            add({"run": what, "error": f"{type(e).__name__}: {e}", "decode_ms_per_token": None, "floor_ms": floor_ms})

    if device.type == "cuda":
        with guarded("GDN paths agree"):
            add(gdn_paths_agree(model, device))

    def runner(method="none", k=1):
        return ModelRunner(model, device, max_slots=1, max_len=max_len, speculative={"method": method, "num_tokens": k})

    # the plain step, and the target's greedy continuation (what the forced profiles hand the drafter)
    plain = runner()
    continuation, seconds, _ = generate(plain, prompt, args.tokens + 4, device=device)
    plain_ms = 1e3 * seconds / (args.tokens + 3)
    add({"run": "ds-qwen-vision tp=1, plain decode step", "decode_ms_per_token": plain_ms, "floor_ms": floor_ms})
    del plain

    verify4_ms = None
    with guarded("ngram verify steps and forced acceptance profiles"):
        for k in (1, 3):
            r = runner("ngram", k)
            r.run(StepPlan(prefill=[Prefill(0, prompt)]))
            drafts = continuation[1:k + 1]
            step = timed_steps(r, lambda: StepPlan(verify=[(0, [continuation[0]] + drafts)]), args.repeats, device)
            verify4_ms = 1e3 * step
            # no accept between them: every timed verify runs at the same position
            add({"run": f"verify step, {k + 1} positions (k={k})", "step_ms": 1e3 * step,
                         "over_plain_step": 1e3 * step / plain_ms, "floor_ms": floor_ms,
                         "decode_ms_per_token": None})
            if k == 3:
                add(first_step_agreement(runner, prompt, continuation))
                for name, profile in PROFILES.items():
                    # In bf16 the verify's rows round differently from the 1-token step's, and a random-weight
                    # argmax is often a near tie: one flip and every later draft from the plain continuation
                    # is wrong. So the reference is the verify path's own greedy output, re-run until the
                    # run follows it (at most 3 runs; how far the last one followed it is recorded).
                    reference = continuation
                    for attempt in range(1, 4):
                        index = Oracle(n_prompt, reference, profile, vocab)
                        out, seconds, stats = generate(r, prompt, args.tokens, index=index, device=device)
                        followed = same_prefix(out, reference)
                        if followed >= args.tokens:
                            break
                        reference = out
                    stats.update(same_tokens_as_plain=same_prefix(out, continuation), reference_runs=attempt,
                                 same_tokens_as_reference=followed)
                    add({"run": f"ngram k=3, {name} (drafter handed the target's continuation)",
                                 "decode_ms_per_token": 1e3 * seconds / (args.tokens - 1), "floor_ms": floor_ms,
                                 "over_plain": 1e3 * seconds / (args.tokens - 1) / plain_ms, **stats})
                out, seconds, stats = generate(r, repetitive, args.tokens, index=NgramIndex(repetitive), device=device)
                add({"run": "ngram k=3, repetitive prompt (a paragraph x4), prompt lookup",
                             "decode_ms_per_token": 1e3 * seconds / (args.tokens - 1), "floor_ms": floor_ms,
                             "over_plain": 1e3 * seconds / (args.tokens - 1) / plain_ms, "label": label, **stats})
            del r

    with guarded("mtp draft and verify"):
        r = runner("mtp", 3)
        r.run(StepPlan(prefill=[Prefill(0, prompt)]))
        # the served step: the head's 3 drafts and the 4-position verify, one graph on CUDA
        step = timed_steps(r, lambda: StepPlan(verify=[(0, [continuation[0]])]), args.repeats, device)
        add({"run": "mtp verify step, 4 positions, drafts included (k=3)", "step_ms": 1e3 * step,
                     "over_plain_step": 1e3 * step / plain_ms, "draft_ms": 1e3 * step - verify4_ms if verify4_ms else None,
                     "decode_ms_per_token": None, "floor_ms": floor_ms})
        r.spec._mtp_prepare(1, [0], [continuation[0]])
        times = []
        for _ in range(args.repeats + 3):
            sync(device)
            t = time.perf_counter()
            r.spec._mtp_forward(1)
            sync(device)
            times.append(time.perf_counter() - t)
        add({"run": "MTP draft step alone, eager (k=3 drafts, one row)", "step_ms": 1e3 * statistics.median(times[3:]),
                     "over_plain_step": 1e3 * statistics.median(times[3:]) / plain_ms, "decode_ms_per_token": None,
                     "floor_ms": floor_ms})
        del r
        r = runner("mtp", 3)
        for name, profile in PROFILES.items():  # the head drafts and is timed as served; acceptance forced
            r.reset()
            _, seconds, stats = generate(r, prompt, args.tokens, device=device, force=profile)
            add({"run": f"mtp k=3, {name} (the head's drafts, acceptance from the profile)",
                 "decode_ms_per_token": 1e3 * seconds / (args.tokens - 1), "floor_ms": floor_ms,
                 "over_plain": 1e3 * seconds / (args.tokens - 1) / plain_ms, **stats})
        r.reset()
        out, seconds, stats = generate(r, prompt, args.tokens, device=device)
        stats["same_tokens_as_plain"] = same_prefix(out, continuation)
        add({"run": "mtp k=3 end to end", "decode_ms_per_token": 1e3 * seconds / (args.tokens - 1),
                     "floor_ms": floor_ms, "over_plain": 1e3 * seconds / (args.tokens - 1) / plain_ms, "label": label,
                     **stats})
    r = None
    if args.draft_vocab:
        with guarded(f"mtp with a draft vocabulary of {args.draft_vocab}"):
            # speculative.draft_vocab (mtp.DraftHead): the same step and forced profiles, the head drafting over
            # the lowest ids (a random checkpoint has no tokenizer to add its special tokens from). The forced
            # outcome decides acceptance, so both rows accept alike: only the drafts' cost differs.
            from ds_qwen_vision.mtp import DraftHead

            model.mtp.draft_head = DraftHead(model.lm_head, list(range(args.draft_vocab)))
            r = runner("mtp", 3)
            r.run(StepPlan(prefill=[Prefill(0, prompt)]))
            step = timed_steps(r, lambda: StepPlan(verify=[(0, [continuation[0]])]), args.repeats, device)
            add({"run": f"mtp verify step, 4 positions, drafts over {args.draft_vocab} ids (k=3)", "step_ms": 1e3 * step,
                 "over_plain_step": 1e3 * step / plain_ms, "draft_ms": 1e3 * step - verify4_ms if verify4_ms else None,
                 "decode_ms_per_token": None, "floor_ms": floor_ms})
            for name, profile in PROFILES.items():
                r.reset()
                _, seconds, stats = generate(r, prompt, args.tokens, device=device, force=profile)
                add({"run": f"mtp k=3, {name}, drafts over {args.draft_vocab} ids (acceptance from the profile)",
                     "decode_ms_per_token": 1e3 * seconds / (args.tokens - 1), "floor_ms": floor_ms,
                     "over_plain": 1e3 * seconds / (args.tokens - 1) / plain_ms, **stats})
        if hasattr(model.mtp, "draft_head"):
            del model.mtp.draft_head
    r = None
    del r, model
    gc.collect()  # the runners' hooks and graphs reference the model in cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if not args.no_baseline:
        row = baseline_static(config, device, dtype, prompt, min(args.tokens, 64))
        row["floor_ms"] = floor_ms
        add(row)

    write(partial=False)
    if not args.no_write:
        print(out_path)


if __name__ == "__main__":
    main()
