"""Drives a ModelRunner through the engine's own scheduler (engine/scheduler.py), with no engine loop and no
text: jobs join the queue at a given step, the scheduler places them (the lowest free slot, KV blocks
reserved from the runner's pool) and plans every step -- chunked prefill within its token budget, decode or,
with speculation, verify (engine/speculative.Speculator) -- and each row's token is picked and read back as
the engine's output path does (its argmax, or engine.sampling.sample; drafts accepted by the Speculator).
The runner, prefill-graph, speculative and fused tests share it."""
import dataclasses

import torch

from ds_qwen_vision.engine.block_manager import BlockPool
from ds_qwen_vision.engine.metrics import EngineMetrics
from ds_qwen_vision.engine.prefix_cache import PrefixCache
from ds_qwen_vision.engine.sampling import RowParams, Sampling, sample
from ds_qwen_vision.engine.scheduler import RequestQueue, Scheduler
from ds_qwen_vision.engine.sequence import Sequence
from ds_qwen_vision.engine.speculative import Speculator
from ds_qwen_vision.plan import Prefill


def prefill_item(slot: int, x: dict, start: int = 0, end: int | None = None):
    """A plan item for prompt tokens [start, end) of inputs `x` in `slot`, and its pixels (a hand-made plan)."""
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


def pick(rows: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    if all(s.sampling.greedy for s in seqs):
        return rows.argmax(-1).tolist()
    params = RowParams.build([s.sampling for s in seqs], [s.generator for s in seqs], rows.shape[-1], rows.device)
    return sample(rows, params).tokens.tolist()


def drive(runner, jobs, n_new: int, chunk: int | None = None, sampling: Sampling | None = None, seed: int = 0,
          stats: dict | None = None, oracle: list | None = None, profile=(1.0,), logits: list | None = None,
          plans: list | None = None) -> list[list[int]]:
    """jobs = [(joins, inputs)] or [(joins, inputs, max_tokens)]: job j joins the queue at step `joins` (an int)
    or once job k has ended (("after", k)), and generates n_new tokens (or its own max_tokens). Prompts are
    prefilled at most `chunk` tokens a step, all of a step's prompts together (None: whole prompts).
    oracle: per job, a continuation the drafter is handed (with `profile`, see OracleIndex).
    Returns each job's tokens; `logits` gets each job's rows of logits ([tokens, vocab]), `plans` every plan."""
    m = EngineMetrics()
    spec = Speculator(runner.spec.method, runner.spec.k, m.registry) if runner.spec is not None else None
    state = runner.state
    scheduler = Scheduler(runner.max_slots, chunk or runner.max_len, RequestQueue(len(jobs)),
                          BlockPool(state.num_blocks, state.block_size), PrefixCache(0, 0, None, -1, 1, None, None,
                                                                                     m.registry),
                          spec, m, kv_slack=runner.kv_len - runner.max_len + 1)
    seqs: list[Sequence | None] = [None] * len(jobs)
    rows: list[list[torch.Tensor]] = [[] for _ in jobs]
    out: list[list[int]] = [[] for _ in jobs]
    step = 0
    while not all(s is not None and s.done for s in seqs):
        for j, (joins, x, *max_tokens) in enumerate(jobs):
            if seqs[j] is not None or not (joins == step if isinstance(joins, int) else
                                           seqs[joins[1]] is not None and seqs[joins[1]].done):
                continue
            n = max_tokens[0] if max_tokens else n_new
            s = dataclasses.replace(sampling or Sampling(max_tokens=n, temperature=0), max_tokens=n)
            ids = x["input_ids"][0].tolist()
            pixels = x.get("pixel_values")
            seq = seqs[j] = Sequence(j, ids, s, pixels, x["image_grid_thw"].tolist() if pixels is not None else [],
                                     reserve=len(ids) + n + scheduler.kv_slack)
            if not s.greedy:
                seq.generator = torch.Generator().manual_seed(seed + j)
            seq.group = [seq]
            scheduler.add(seq.group)
        plan = scheduler.schedule()
        if oracle is not None:  # a sequence just admitted drafts from its oracle
            for j, seq in enumerate(seqs):
                if seq is not None and seq.spec is not None and not isinstance(seq.spec.index, OracleIndex):
                    seq.spec.index = OracleIndex(seq.input_ids, oracle[j], profile, seed + j,
                                                 runner.config.text_config.vocab_size)
        if plans is not None:
            plans.append(plan)
        pixels = {p.slot: scheduler.running[p.slot].pixel_values for p in plan.prefill if p.pixels_shape}
        result = runner.run(plan, pixels)
        delivered: dict[int, list[int]] = {}
        for slot, _ in plan.verify:  # as Engine.accept: drafts accepted, or the row's first position
            seq, verified = scheduler.running[slot], result.pop(slot)
            drafts = spec.drafts(seq, runner.verified[slot])
            if drafts:
                delivered[slot] = spec.tokens(seq, verified, drafts)
            else:
                seq.spec.accept = 0
                result[slot] = verified[0]
        if result:
            batch = [scheduler.running[slot] for slot in result]
            tokens = pick(torch.stack(list(result.values())), batch)
            if not plan.hold:  # as Engine.launch: the picks go on to the next step on the device
                runner.feed(list(result), torch.tensor(tokens))
            for slot, seq, token, row in zip(result, batch, tokens, result.values()):
                seq.in_flight -= 1
                rows[seq.id].append(row)
                delivered[slot] = [token]
        for slot, tokens in delivered.items():
            seq = scheduler.running[slot]
            if plan.hold:  # as Engine.accept: every token of the step read in it
                seq.in_flight = 0
            for token in tokens:  # as Output.deliver, without the text
                out[seq.id].append(token)
                seq.generated += 1
                seq.next_token = token
                if seq.generated == seq.sampling.max_tokens:
                    seq.done = True
                    break
        step += 1
    runner.run(scheduler.schedule())  # the ended sequences' slots released: their tables to the null block
    if logits is not None:
        logits.extend(torch.stack(r) for r in rows)
    if stats is not None and spec is not None:
        stats["drafts"] = spec.m_drafts._value.get()
        stats["accepted"] = spec.m_accepted._value.get()
        stats["steps"] = step
    return out


class ReplayedGraph:
    """A CUDA graph's stand-in on CPU: a replay runs the captured function again and copies what it returns
    into the tensors the capture returned, as a replay refills its outputs in place."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self):
        new = self.fn()
        for old, fresh in zip(*(x if isinstance(x, tuple) else (x,) for x in (self.out, new))):
            if old is not None:
                old.copy_(fresh)
