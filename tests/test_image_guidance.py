"""Classifier-free guidance arithmetic and the restricted-vocabulary sampling path against full-vocabulary
references built from `transformers`' own logits processors (no model, no export: fast)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ardeploy.runtime.guidance import Guidance, RangeSampler, guide, image_generators
from ardeploy.runtime.sampling import SamplingConfig

VOCAB, LO, HI = 1000, 600, 900


def logits_pair(seed: int = 0, rows: int = 3):
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 3, (rows, VOCAB)).astype(np.float32), rng.normal(0, 3, (rows, VOCAB)).astype(np.float32))


def test_raw_logit_cfg_is_llamagens_formula_bit_for_bit():
    c, u = logits_pair()
    for s in (4.0, 1.75, 0.5):
        want = (torch.from_numpy(u) + (torch.from_numpy(c) - torch.from_numpy(u)) * s).numpy()
        assert np.array_equal(guide(c, u, s), want)
    assert np.array_equal(guide(c, u, 1.0), c) and np.array_equal(guide(c, None, 3.0), c)


def full_vocab_reference(c, u, scale, temperature, top_k, top_p):
    """Emu3 / HF style: log-softmax CFG over the whole vocabulary, mask to the visual range, then
    transformers' temperature, top-k and top-p warpers -> probabilities [rows, VOCAB]."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    lc, lu = torch.log_softmax(torch.from_numpy(c).double(), -1), torch.log_softmax(torch.from_numpy(u).double(), -1)
    x = lu + scale * (lc - lu)
    keep = torch.zeros(VOCAB, dtype=torch.bool)
    keep[LO:HI] = True
    x = x.masked_fill(~keep, -float("inf"))
    ids = torch.zeros((len(c), 1), dtype=torch.long)
    if temperature != 1.0:
        x = TemperatureLogitsWarper(temperature)(ids, x)
    if top_k:
        x = TopKLogitsWarper(top_k)(ids, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(ids, x)
    return torch.softmax(x.double(), -1).numpy()


@pytest.mark.parametrize("scale,temperature,top_k,top_p", [(3.0, 1.0, 0, 1.0), (5.0, 1.0, 50, 1.0),
                                                           (2.0, 0.7, 120, 0.9), (1.5, 1.3, 0, 0.8)])
def test_restricted_path_equals_full_vocabulary(scale, temperature, top_k, top_p):
    c, u = logits_pair(seed=int(scale * 10))
    ref = full_vocab_reference(c, u, scale, temperature, top_k, top_p)
    assert ref[:, :LO].sum() == 0 and ref[:, HI:].sum() == 0
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    sampler = RangeSampler(cfg, LO, HI, image_generators(7, 0, len(c)))
    x = sampler.sampler.distribution(guide(c[:, LO:HI], u[:, LO:HI], scale), [[]] * len(c))
    ours = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    ours /= ours.sum(-1, keepdims=True)
    assert np.array_equal(ours > 0, ref[:, LO:HI] > 0)            # the same candidate set
    # equal up to float32 rounding of the guided logits (the reference works in float64)
    support = ref[:, LO:HI] > 0
    assert np.abs(ours[support] / ref[:, LO:HI][support] - 1).max() < 2e-5
    # the same draws: our sampler vs inverse-CDF draws from the full-vocabulary distribution
    tokens = sampler(guide(c[:, LO:HI], u[:, LO:HI], scale))
    rngs = image_generators(7, 0, len(c))
    cdf = np.cumsum(ref, -1)
    want = [int(np.searchsorted(row, rng.random() * row[-1], side="right")) for row, rng in zip(cdf, rngs)]
    assert tokens.tolist() == want


def test_greedy_restricted_equals_full_argmax():
    c, u = logits_pair(seed=3, rows=8)
    ref = full_vocab_reference(c, u, 3.0, 1.0, 0, 1.0)
    sampler = RangeSampler(SamplingConfig(greedy=True), LO, HI, image_generators(0, 0, 8))
    assert sampler(guide(c[:, LO:HI], u[:, LO:HI], 3.0)).tolist() == ref.argmax(-1).tolist()


def test_schedule_and_interval():
    g = Guidance(4.0, interval=2)
    assert [g.scale_at(i, 10) for i in range(5)] == [4.0, 4.0, 4.0, 4.0, 1.0]    # LlamaGen: tokens 0..interval+1
    lin = Guidance(3.0, schedule="linear")
    assert lin.scale_at(0, 5) == 1.0 and lin.scale_at(4, 5) == 3.0 and lin.scale_at(2, 5) == 2.0
    assert not Guidance(1.0).active and Guidance(0.0).active
    with pytest.raises(ValueError, match="schedule"):
        Guidance(2.0, schedule="cosine")


def test_generators_do_not_depend_on_batching():
    a = [g.random() for g in image_generators(5, 0, 4)]
    b = [g.random() for g in image_generators(5, 0, 2) + image_generators(5, 2, 2)]
    assert a == b


def test_png_writer_roundtrip(tmp_path):
    from PIL import Image

    from ardeploy.runtime.png import write_png
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = write_png(tmp_path / "x.png", rgb)
    with Image.open(path) as im:
        assert im.size == (7, 5) and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
