"""engine.sampling: the batched sampler against independent references -- transformers' own logits
processors and warpers for repetition penalty, temperature, top-k, top-p and min-p, OpenAI's published
formula for the frequency / presence penalties written out as a loop -- and its draws: on the logits'
device, per-row generators (the seed decides), greedy rows exact, draws following the distribution."""
import math

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from ds_qwen_vision.engine.sampling import (PenaltyState, RowParams, Sampling, apply_penalties, filter_logits,
                                            generation_defaults, sample)

V = 500
LOGITS = torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def params(rows: list[Sampling], seeds: list[int | None] | None = None) -> RowParams:
    seeds = seeds if seeds is not None else list(range(len(rows)))
    return RowParams.build(rows, [None if s is None else gen(s) for s in seeds], V, "cpu")


def test_greedy_and_vanishing_temperature_pick_the_argmax():
    rows = [Sampling(1, temperature=0), Sampling(1, temperature=1e-300), Sampling(1, temperature=1e-6),
            Sampling(1, temperature=0.7, top_k=3)]
    picked = sample(LOGITS, params(rows, [None, 1, 2, None]))  # the last: no generator, greedy
    assert picked.tokens.tolist() == LOGITS.argmax(-1).tolist()
    assert picked.logprob is None  # nobody asked


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (0.7, -1, 1.0, 0.0), (1.0, 7, 1.0, 0.0), (1.3, -1, 0.8, 0.0), (1.0, -1, 1.0, 0.1),
    (0.6, 20, 0.95, 0.0), (0.9, 50, 0.5, 0.05), (1.0, 300, 0.9, 0.0), (2.0, 400, 1.0, 0.02)])
@pytest.mark.parametrize("fourth", ["untouched", "greedy"])  # the full path, and the top-k candidates' path
def test_filtering_equals_transformers_warpers(temperature, top_k, top_p, min_p, fourth):
    last = Sampling(1) if fourth == "untouched" else Sampling(1, temperature=0)
    rows = [Sampling(1, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)] * 3 + [last]
    p = params(rows, None if fourth == "untouched" else [0, 1, 2, None])
    assert bool(p.top_k_max) == (fourth == "greedy" and top_k > 0)
    got = filter_logits(LOGITS, p)
    warpers = [TemperatureLogitsWarper(temperature)]
    warpers += [TopKLogitsWarper(top_k)] if top_k > 0 else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warpers += [MinPLogitsWarper(min_p)] if min_p > 0 else []
    expected = LOGITS[:3].clone()
    for w in warpers:
        expected = w(None, expected)
    kept = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got[:3]), kept)
    assert kept.sum(-1).min() >= 1 and (top_k <= 0 and top_p == 1 and min_p == 0 or (~kept).any())
    torch.testing.assert_close(got[:3][kept], expected[kept])
    if fourth == "untouched":
        assert torch.equal(got[3], LOGITS[3])  # a row without parameters is untouched, in the same batch


def openai_penalties(logits: list[float], generated: list[int], presence: float, frequency: float) -> list[float]:
    """OpenAI's definition: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c = counts of generated tokens."""
    out = list(logits)
    for j in range(len(out)):
        c = generated.count(j)
        out[j] = out[j] - c * frequency - (1.0 if c > 0 else 0.0) * presence
    return out


def state_for(prompts: list[list[int]], generated: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    state = PenaltyState(len(prompts))
    slots = torch.arange(len(prompts))
    for slot, prompt in enumerate(prompts):
        state.start(slot, prompt, V, torch.device("cpu"))
    for step in range(max(map(len, generated))):  # row-wise records, as the engine does each step
        rows = [i for i, g in enumerate(generated) if step < len(g)]
        state.record(slots[rows], torch.tensor([generated[i][step] for i in rows]))
    return state.rows(slots)


PROMPTS = [[1, 2, 3, 3], [4, 5], [6], [7, 8, 9]]
GENERATED = [[10, 10, 11, 2, 10], [5, 12], [13, 13, 13], [14]]


def test_presence_and_frequency_penalties_follow_openai_definition():
    rows = [Sampling(1, presence_penalty=0.5, frequency_penalty=0.3), Sampling(1, presence_penalty=-1.2),
            Sampling(1, frequency_penalty=2.0), Sampling(1)]
    counts, prompt = state_for(PROMPTS, GENERATED)
    got = apply_penalties(LOGITS, params(rows), counts, prompt)
    for i, s in enumerate(rows):
        expected = openai_penalties(LOGITS[i].tolist(), GENERATED[i], s.presence_penalty, s.frequency_penalty)
        torch.testing.assert_close(got[i], torch.tensor(expected))
    assert not torch.equal(got[:3], LOGITS[:3])  # the penalties did something


def test_repetition_penalty_equals_transformers_over_prompt_and_output():
    rows = [Sampling(1, repetition_penalty=1.3), Sampling(1, repetition_penalty=0.7), Sampling(1),
            Sampling(1, repetition_penalty=2.0)]
    counts, prompt = state_for(PROMPTS, GENERATED)
    got = apply_penalties(LOGITS, params(rows), counts, prompt)
    for i, s in enumerate(rows):
        ids = torch.tensor([PROMPTS[i] + GENERATED[i]])  # transformers penalises every token in input_ids
        expected = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, LOGITS[i:i + 1].clone())[0]
        torch.testing.assert_close(got[i], expected)


def test_penalties_steer_greedy_picks():
    row = LOGITS[:1]
    best = int(row.argmax())
    counts = torch.zeros(1, V, dtype=torch.int32)
    counts[0, best] = 1
    p = params([Sampling(1, temperature=0, presence_penalty=2.0, frequency_penalty=2.0)], [None])
    gap = float(row[0, best] - row[0].topk(2).values[1])
    assert int(sample(row, p, counts, torch.zeros(1, V, dtype=torch.bool)).tokens) == (best if gap > 4 else
                                                                                        int(row[0].topk(2).indices[1]))


def test_the_mask_hook_restricts_every_row():
    allowed = torch.zeros(4, V, dtype=torch.bool)
    allowed[:, 100:103] = True
    rows = [Sampling(1, temperature=0), Sampling(1, temperature=1.0), Sampling(1, temperature=2.0), Sampling(1)]
    for _ in range(20):
        tokens = sample(LOGITS, params(rows), mask=allowed).tokens
        assert all(100 <= t < 103 for t in tokens.tolist())
    additive = torch.full((4, V), float("-inf"))
    additive[:, 7] = 0
    assert sample(LOGITS, params(rows), mask=additive).tokens.tolist() == [7] * 4


def test_logprobs_are_the_raw_distribution():
    rows = [Sampling(1, temperature=0.5, top_k=3, presence_penalty=1.0, logprobs=True, top_logprobs=5),
            Sampling(1, logprobs=True), Sampling(1, temperature=0, logprobs=True, top_logprobs=20), Sampling(1)]
    counts, prompt = state_for(PROMPTS, GENERATED)
    picked = sample(LOGITS, params(rows), counts, prompt)
    reference = torch.log_softmax(LOGITS.double(), -1)
    torch.testing.assert_close(picked.logprob.double(), reference.gather(1, picked.tokens[:, None])[:, 0],
                               atol=1e-5, rtol=0)
    top = reference.topk(20, -1)
    assert picked.top_ids.shape == (4, 20)
    assert torch.equal(picked.top_ids, top.indices)
    torch.testing.assert_close(picked.top_logprobs.double(), top.values, atol=1e-5, rtol=0)


def test_draws_follow_the_filtered_distribution_per_row_and_the_seed_decides():
    rows = [Sampling(1, temperature=0.8, top_k=5), Sampling(1, temperature=1.0, top_p=0.6),
            Sampling(1, temperature=0.0), Sampling(1, temperature=1.5, min_p=0.2)]
    seeds = [11, 12, None, 13]
    p = params(rows, seeds)
    draws = torch.stack([sample(LOGITS, p).tokens for _ in range(3000)])  # [3000, 4]
    expected = filter_logits(LOGITS, p).softmax(-1)
    for i in (0, 1, 3):
        freq = torch.bincount(draws[:, i], minlength=V).double() / len(draws)
        assert set(torch.nonzero(freq).flatten().tolist()) <= set(torch.nonzero(expected[i]).flatten().tolist())
        assert (freq - expected[i]).abs().max() < 0.04, i  # ~4 sigma at 3000 draws
    assert set(draws[:, 2].tolist()) == {int(LOGITS[2].argmax())}
    # Every sampled row with a top_k: the draws come from the top-k candidates (the fast path).
    fast = params([Sampling(1, temperature=0.9, top_k=8), Sampling(1, temperature=1.2, top_k=30, top_p=0.7),
                   Sampling(1, temperature=0), Sampling(1, temperature=1.0, top_k=12, min_p=0.1)], seeds)
    assert fast.top_k_max == 30
    draws = torch.stack([sample(LOGITS, fast).tokens for _ in range(3000)])
    expected = filter_logits(LOGITS, fast).softmax(-1)
    for i in (0, 1, 3):
        freq = torch.bincount(draws[:, i], minlength=V).double() / len(draws)
        assert set(torch.nonzero(freq).flatten().tolist()) <= set(torch.nonzero(expected[i]).flatten().tolist())
        assert (freq - expected[i]).abs().max() < 0.04, i
    again = params(rows, seeds)
    first = [sample(LOGITS, again).tokens.tolist() for _ in range(30)]
    again = params(rows, seeds)
    assert [sample(LOGITS, again).tokens.tolist() for _ in range(30)] == first
    other = params(rows, [21, 22, None, 23])
    assert [sample(LOGITS, other).tokens.tolist() for _ in range(30)] != first


def test_generation_defaults_take_only_what_the_config_sets():
    from transformers import GenerationConfig

    assert generation_defaults(GenerationConfig(temperature=0.6, top_p=0.95, top_k=20, do_sample=True,
                                                eos_token_id=[1])) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert generation_defaults(GenerationConfig(eos_token_id=[1])) == {}
    s = Sampling.from_request({"temperature": None, "top_k": 0, "min_p": 0.1}, {"temperature": 0.6, "top_k": 20}, 5)
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (0.6, -1, 1.0, 0.1)
    assert not math.isnan(s.repetition_penalty)


def test_a_sampled_row_without_a_generator_still_filters():
    """speculative.target_probs asks for the filtered distribution of rows it draws from itself."""
    p = RowParams.build([Sampling(1, temperature=0.5, top_k=3)], [None], V, "cpu")
    got = filter_logits(LOGITS[:1], p)
    assert int(torch.isfinite(got).sum()) == 3
    torch.testing.assert_close(got[0, LOGITS[0].topk(3).indices], LOGITS[0].topk(3).values / 0.5)
    assert sample(LOGITS[:1], p).tokens.tolist() == [int(LOGITS[0].argmax())]  # no noise: the most likely
