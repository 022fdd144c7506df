"""engine.sample: picks stay on the logits' device (a 0-d tensor, no host sync) and follow the request's
temperature, top-k, top-p and seed."""
import torch

from ds_qwen_vision.engine import Sampling, sample

LOGITS = torch.randn(5000, generator=torch.Generator().manual_seed(0))


def draws(s: Sampling, seed: int = 7, n: int = 300) -> list[int]:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    out = [sample(LOGITS, s, g) for _ in range(n)]
    assert all(t.dim() == 0 and t.device == LOGITS.device for t in out)
    return [int(t) for t in out]


def test_greedy_and_vanishing_temperature_pick_the_argmax():
    best = int(LOGITS.argmax())
    assert int(sample(LOGITS, Sampling(1, temperature=0), None)) == best
    assert set(draws(Sampling(1, temperature=1e-300))) == {best}


def test_top_k_and_top_p_restrict_the_candidates():
    top3 = set(LOGITS.topk(3).indices.tolist())
    assert set(draws(Sampling(1, temperature=1.0, top_k=3))) <= top3
    probs = torch.softmax(LOGITS.double(), -1)
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(0)
    nucleus = set(order[: int((mass < 0.5).sum()) + 1].tolist())  # smallest prefix reaching 0.5
    got = set(draws(Sampling(1, temperature=1.0, top_p=0.5)))
    assert got <= nucleus and len(got) > 1


def test_the_seed_decides_the_draws():
    s = Sampling(1, temperature=0.8)
    assert draws(s, seed=1) == draws(s, seed=1)
    assert draws(s, seed=1) != draws(s, seed=2)
