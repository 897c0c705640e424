"""The sampler against `transformers`' processors/warpers (probability vectors, not samples),
seeded reproducibility, and a chi-square test of the draws."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation import logits_process as lp

from ardeploy.runtime.sampling import Sampler, SamplingConfig, min_p, repetition_penalty, softmax, temperature, top_k, top_p


def probs_np(x):
    return softmax(x.astype(np.float64))


def probs_torch(x):
    return torch.softmax(x.double(), dim=-1).numpy()


def random_logits(rows=4, vocab=64, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2, (rows, vocab)).astype(np.float32)
    if ties:   # coarse values: many exact ties, including around every cut-off
        x = np.round(x * 2) / 2
    return x


def check(ours, theirs, logits, input_ids=None, tie_groups_may_swap=False):
    """Same filtered distribution as transformers.

    tie_groups_may_swap: transformers' top-p sorts with torch's unstable sort, so when equal logits
    straddle the cut it is arbitrary *which* of them go (ours: the lower indices, a stable sort).
    How many go is fixed by the values, so the distribution is the same up to swapping tokens with
    identical logits: compare it as a multiset, and exactly for every token not tied at the cut.
    """
    ids = torch.tensor(input_ids if input_ids is not None else [[0]] * len(logits))
    ref = theirs(ids, torch.from_numpy(logits.copy())).numpy()
    got = ours(logits.copy(), [list(r) for r in ids.tolist()])
    if not tie_groups_may_swap:
        assert np.array_equal(np.isneginf(got), np.isneginf(ref)), "different tokens removed"
        np.testing.assert_allclose(probs_np(got), probs_torch(torch.from_numpy(ref)), atol=1e-6)
        return
    np.testing.assert_allclose(np.sort(probs_np(got)), np.sort(probs_torch(torch.from_numpy(ref))), atol=1e-6)
    for row in range(len(logits)):
        differ = np.isneginf(got[row]) != np.isneginf(ref[row])
        # tokens kept by one and removed by the other must all share one logit value (the tie at the cut)
        assert len(set(logits[row][differ].tolist())) <= 1
        assert differ.sum() % 2 == 0


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("t", [0.3, 0.7, 1.5])
def test_temperature(t, ties):
    check(temperature(t), lp.TemperatureLogitsWarper(t), random_logits(ties=ties))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5, 40, 64, 100])
def test_top_k(k, ties):
    check(top_k(k), lp.TopKLogitsWarper(k), random_logits(ties=ties, seed=k))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [1e-9, 0.05, 0.3, 0.5, 0.9, 0.95, 0.999999])
def test_top_p(p, ties):
    check(top_p(p), lp.TopPLogitsWarper(p), random_logits(ties=ties, seed=int(p * 1000)), tie_groups_may_swap=ties)


def test_top_p_exact_boundary():
    """Cumulative probability landing exactly on 1 - top_p: that token is removed (<=), as in transformers."""
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], dtype=np.float32))
    check(top_p(0.7), lp.TopPLogitsWarper(0.7), logits)
    check(top_p(0.6), lp.TopPLogitsWarper(0.6), logits)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 1.0])
def test_min_p(p, ties):
    check(min_p(p), lp.MinPLogitsWarper(p), random_logits(ties=ties, seed=7))


@pytest.mark.parametrize("penalty", [0.5, 1.1, 1.3, 2.0])
def test_repetition_penalty(penalty):
    logits = random_logits(rows=2, seed=3)
    history = [[1, 5, 5, 9, 63], [0, 2, 40, 40, 2]]
    check(repetition_penalty(penalty), lp.RepetitionPenaltyLogitsProcessor(penalty), logits, history)


def test_chain_matches_transformers_order():
    """Penalty, temperature, top-k, top-p, min-p together, in the order transformers applies them."""
    cfg = SamplingConfig(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2, seed=0)
    logits = random_logits(rows=3, seed=11)
    history = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    got = Sampler(cfg, 3).distribution(logits, history)
    ref = torch.from_numpy(logits.copy())
    ids = torch.tensor(history)
    for proc in (lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.8), lp.TopKLogitsWarper(20),
                 lp.TopPLogitsWarper(0.9), lp.MinPLogitsWarper(0.05)):
        ref = proc(ids, ref)
    np.testing.assert_allclose(probs_np(got), probs_torch(ref), atol=1e-6)


def test_greedy_and_seeded_reproducibility():
    logits = random_logits(rows=3, seed=5)
    assert Sampler(SamplingConfig(greedy=True), 3)(logits, [[]] * 3).tolist() == logits.argmax(-1).tolist()
    cfg = SamplingConfig(top_p=0.9, seed=42)
    a = [Sampler(cfg, 3)(logits, [[]] * 3).tolist() for _ in range(2)]
    s = Sampler(cfg, 3)
    draws = [s(logits, [[]] * 3).tolist() for _ in range(50)]
    s2 = Sampler(cfg, 3)
    assert draws == [s2(logits, [[]] * 3).tolist() for _ in range(50)]
    assert a[0] == a[1]
    assert len({tuple(d) for d in draws}) > 1          # it does sample
    # rows draw from their own generators: row 1 of a batch == row 0 of a sampler seeded 43
    solo = Sampler(SamplingConfig(top_p=0.9, seed=43), 1)
    assert [d[1] for d in draws] == [solo(logits[1:2], [[]])[0] for _ in range(50)]


def test_chi_square_does_not_reject():
    """50,000 draws from a known 6-way distribution: chi-square statistic under the 0.1% critical value."""
    p = np.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])
    logits = np.log(p)[None, :].astype(np.float32)
    s = Sampler(SamplingConfig(seed=123), 1)
    n = 50_000
    counts = np.bincount([int(s(logits, [[]])[0]) for _ in range(n)], minlength=6)
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 20.52, (chi2, counts)      # chi2(5 dof) at p = 0.001
    # and it is not trivially passing: a wrong distribution is rejected
    wrong = np.full(6, 1 / 6)
    assert float(((counts - n * wrong) ** 2 / (n * wrong)).sum()) > 20.52


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=-0.1), dict(top_p=1.5), dict(temperature=-1.0),
                                 dict(top_k=-1), dict(min_p=2.0), dict(repetition_penalty=0.0),
                                 dict(max_new_tokens=0)])
def test_invalid_values_named(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SamplingConfig(**bad)
