"""Drives a ModelRunner with speculation the way the engine does (engine/speculative.Speculator schedules,
accepts and counts), for sequences that join and leave, with chunked prefill in the same steps."""
from types import SimpleNamespace

import torch

from ds_qwen_vision.engine.sampling import Sampling
from ds_qwen_vision.engine.speculative import Speculator
from ds_qwen_vision.plan import Prefill, StepPlan


def prefill_item(slot: int, x: dict, start: int = 0, end: int | None = None):
    ids = x["input_ids"][0].tolist()
    pixels = x.get("pixel_values") if start == 0 else None
    grid = x["image_grid_thw"].tolist() if pixels is not None else []
    item = Prefill(slot, ids, grid, tuple(pixels.shape) if pixels is not None else None, start, end)
    return item, ({slot: pixels} if pixels is not None else {})


class OracleIndex:
    """A drafter handed a known continuation (ngram's host path carries it): draft i is the true next token
    with probability profile[i] (given the earlier ones were), else a wrong one -- forced acceptance."""

    def __init__(self, prompt: list[int], continuation: list[int], profile, seed: int, vocab: int):
        import random
        self.tokens, self.n_prompt, self.cont, self.profile = list(prompt), len(prompt), continuation, profile
        self.rng, self.vocab = random.Random(seed), vocab

    def extend(self, tokens):
        self.tokens.extend(tokens)

    def draft(self, k: int) -> list[int]:
        g = len(self.tokens) - self.n_prompt
        out = []
        for i, true in enumerate(self.cont[g:g + k]):
            p = self.profile[min(i, len(self.profile) - 1)]
            out.append(true if self.rng.random() < p else (true + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab)
        return out


def drive(runner, jobs, n_new: int, chunk: int | None = None, sampling: Sampling | None = None,
          seed: int = 0, stats: dict | None = None, oracle: list | None = None, profile=(1.0,)) -> list[list[int]]:
    """jobs = [(joins, slot, inputs)]: a job joins at step `joins` (int) or after job k ended (("after", k)).
    oracle: per job, a continuation the drafter is handed (with `profile`, see OracleIndex).
    Returns each job's n_new tokens."""
    spec = None
    if runner.spec is not None:
        from prometheus_client import CollectorRegistry
        spec = Speculator(runner.spec.method, runner.spec.k, CollectorRegistry())
    seqs = [None] * len(jobs)
    finished = set()
    step = 0
    while len(finished) < len(jobs):
        plan, pixels, slot_job = StepPlan(), {}, {}
        for j, (joins, slot, x) in enumerate(jobs):
            if j in finished:
                continue
            if seqs[j] is None:
                if not (joins == step if isinstance(joins, int) else joins[1] in finished):
                    continue
                s = sampling or Sampling(max_tokens=n_new, temperature=0)
                gen = None
                if s.temperature > 0:
                    gen = torch.Generator().manual_seed(seed + j)
                seqs[j] = SimpleNamespace(slot=slot, input_ids=x["input_ids"][0].tolist(), prefilled=0,
                                          next_token=None, generated=0, out=[], sampling=s, generator=gen, spec=None)
                if spec is not None:
                    spec.start(seqs[j])
                    if oracle is not None:
                        seqs[j].spec.index = OracleIndex(seqs[j].input_ids, oracle[j], profile, seed + j,
                                                         runner.config.text_config.vocab_size)
            seq = seqs[j]
            slot_job[slot] = j
            n = len(seq.input_ids)
            if seq.prefilled < n:
                end = n if chunk is None else min(n, seq.prefilled + chunk)
                item, px = prefill_item(slot, x, seq.prefilled, end)
                plan.prefill.append(item)
                pixels.update(px)
                seq.prefilled = end
            elif spec is not None:
                spec.schedule(plan, seq)
            else:
                plan.decode.append((slot, seq.next_token))
        if spec is not None:
            spec.merge(plan)
        logits = runner.run(plan, pixels)
        verified = {slot for slot, _ in plan.verify}
        for slot, row in logits.items():
            seq = seqs[slot_job[slot]]
            tokens = None
            if slot in verified:  # as Engine.after_step: drafts accepted, or the row's first position
                drafts = spec.drafts(seq, runner.verified[slot])
                if drafts:
                    tokens = spec.tokens(seq, row, drafts)
                else:
                    seq.spec.accept = 0
                    row = row[0]
            if tokens is None and not seq.sampling.greedy:
                from ds_qwen_vision.engine.sampling import RowParams, sample
                params = RowParams.build([seq.sampling], [seq.generator], row.shape[-1], row.device)
                tokens = sample(row[None], params).tokens.tolist()
            elif tokens is None:
                tokens = [int(torch.argmax(row))]
            for token in tokens:
                seq.out.append(token)
                seq.generated += 1
                seq.next_token = token
                if seq.generated == seq.sampling.max_tokens:
                    finished.add(slot_job[slot])
                    break
        step += 1
    if stats is not None and spec is not None:
        stats["drafts"] = spec.m_drafts._value.get()
        stats["accepted"] = spec.m_accepted._value.get()
        stats["steps"] = step
    return [s.out for s in seqs]
