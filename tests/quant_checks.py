"""Numerical checks of quantized bundles, shared by test_calibration.py (tiny models) and
test_calibration_smollm2.py: teacher-forced logits of the decode graph (through the runtime's
OrtBackend, as users run it) and of the score graph, their distance to FP32, greedy agreement, a
tiny model with peaked logits, and a deliberately broken quantizer (so the suite shows its
accuracy checks can fail).

Adding a scheme to the checks is one entry in the bounds of the tests that use these helpers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import onnx

from ardeploy.calibration import evaluate as ev
from ardeploy.runtime.bundle import Bundle


# -- logits, teacher-forced ---------------------------------------------------------------------
def score_session(bundle, threads: int | None = None):
    return ev.session(Bundle.load(bundle).graph_path("score"), threads=threads)


def score_logits(bundle, ids, threads: int | None = None, session=None) -> np.ndarray:
    """Score-graph logits of every position of one sequence, [n, vocab] (`session`: one made by
    score_session, to run several sequences)."""
    return ev.score_fn(session or score_session(bundle, threads))(np.asarray(ids, np.int64))


def decode_backend(bundle, threads: int | None = None):
    """The backend `Generator.load(bundle)` runs: OrtBackend on the bundle's decode graph (the ONNX
    Runtime flavor when the bundle has one; a calibrated bundle has only the portable one)."""
    from ardeploy.runtime.backends.ort import OrtBackend
    return OrtBackend(Bundle.load(bundle), threads=threads)


def decode_logits(bundle, ids, prefill: int, threads: int | None = None, backend=None) -> np.ndarray:
    """The runtime's path (`decode_backend`): the first `prefill` tokens in one step, as the Generator
    feeds a prompt, then one token per step. Returns the logits of positions prefill-1 .. n-1,
    [n - prefill + 1, vocab]."""
    ids = np.asarray(ids, np.int64)
    backend = backend or decode_backend(bundle, threads)
    arena = backend.new_arena(1)
    arena.reset(1)
    out = [backend.step(ids[None, :prefill], np.ones((1, prefill), np.int64), arena)[0].copy()]
    for t in range(prefill, len(ids)):
        out.append(backend.step(ids[None, t:t + 1], np.ones((1, t + 1), np.int64), arena)[0].copy())
    return np.stack(out)


def check_ort_graph_matches_portable(bundle, ids: np.ndarray, threads: int | None = None) -> None:
    """A calibrated bundle's ONNX Runtime graph runs through the runtime and gives its portable graph's
    logits (to 1e-3 of their spread) for the prompt `ids` [1, S]."""
    from ardeploy.runtime import Generator
    logits = {}
    for flavor in ("portable", "ort"):
        backend = Generator.load(bundle, backend="ort", flavor=flavor, threads=threads).backend
        assert backend.flavor == flavor
        logits[flavor] = backend.step(ids, np.ones_like(ids), backend.new_arena())
    np.testing.assert_allclose(logits["ort"], logits["portable"], atol=1e-3 * float(logits["portable"].std()))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(got: np.ndarray, ref: np.ndarray, targets: np.ndarray | None = None) -> dict:
    """How far `got` is from `ref` (rows: positions): max |Δlogit|, mean and max KL(ref || got) in
    nats, top-1 agreement, and with `targets` (the next tokens) the perplexity ratio got / ref."""
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    r = {"max_abs": float(np.abs(np.asarray(got, np.float64) - ref).max()), "kl_mean": float(kl.mean()),
         "kl_max": float(kl.max()), "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).mean()),
         "positions": int(len(ref))}
    if targets is not None:
        rows = np.arange(len(targets))
        r["ppl_ratio"] = float(np.exp((lp[rows, targets] - lq[rows, targets]).mean()))
    return r


# -- greedy agreement ---------------------------------------------------------------------------
def greedy_agreement(logits: np.ndarray, reference_tokens, reference_logits: np.ndarray | None = None) -> dict:
    """Teacher-forced along a reference greedy continuation (logits[i] predicts reference_tokens[i]):
    `prefix`, the tokens a free-running greedy run reproduces before its first difference (up to
    that point its context is the reference's, so its choices are these argmaxes), and `matches`,
    positions whose argmax is the reference token. With the reference's logits: `worst_margin`, the
    largest gap between the reference's best and second-best logit at a position that differs."""
    ref = np.asarray(reference_tokens)
    same = np.asarray(logits).argmax(-1) == ref
    prefix = int(np.argmin(same)) if not same.all() else len(ref)
    r = {"prefix": prefix, "matches": int(same.sum()), "n": int(len(ref))}
    if reference_logits is not None:
        top2 = np.sort(np.asarray(reference_logits, np.float64), axis=-1)[:, -2:]
        gaps = (top2[:, 1] - top2[:, 0])[~same]
        r["worst_margin"] = float(gaps.max()) if len(gaps) else 0.0
    return r


def distribution(values) -> dict:
    v = np.asarray(values)
    return {"values": [int(x) for x in v], "min": int(v.min()), "median": float(np.median(v)),
            "max": int(v.max())}


# -- a tiny model with peaked logits --------------------------------------------------------------
PEAKED_HEAD = 20.0
"""HF's default init (std 0.02) gives logits of std ~0.16 over 256 tokens: near-uniform, so the
perplexity ratio is ~1 whatever the quantizer does. A head 20x larger gives logits of std ~3 and a
next-token entropy of about 2.5 nats (of ln 256 = 5.5), like a trained model's; the decoder layers
stay as initialized, so they keep their share of the residual stream and their quantization error
reaches the logits."""


def peaked_bundle(fp_bundle, out: Path, head_scale: float = PEAKED_HEAD) -> Path:
    """A copy of an untied FP32 bundle with its LM head scaled by `head_scale` in weights.bin (the
    same as exporting a checkpoint whose head is that much larger: the head is one MatMul)."""
    shutil.copytree(fp_bundle, out)
    model = onnx.load(str(out / "score.onnx"), load_external_data=False)
    (head,) = [t for t in model.graph.initializer if t.name == "lm_head.weight"]
    assert head.data_type == onnx.TensorProto.FLOAT, "peaked_bundle expects an FP32 bundle"
    info = {e.key: e.value for e in head.external_data}
    data = np.memmap(out / info["location"], dtype=np.float32, mode="r+",
                     offset=int(info["offset"]), shape=(int(info["length"]) // 4,))
    data *= np.float32(head_scale)
    data.flush()
    del data
    return out


def sample_stream(bundle, sequences: int, length: int, seed: int = 0) -> np.ndarray:
    """`sequences` runs of `length` tokens drawn from the model itself (temperature 1), concatenated.
    On its own samples a model's expected NLL is its entropy and any change to its logits adds
    KL(p || q) >= 0, so a perplexity ratio measured on them cannot come out below 1 in expectation
    (on random tokens a perturbation moves it either way)."""
    b = Bundle.load(bundle)
    sess = ev.session(b.graph_path("score"))
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, b.vocab_size, (sequences, 1))
    for _ in range(length - 1):
        logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][:, -1]
        p = np.exp(log_softmax(logits))
        u = rng.random((sequences, 1))
        nxt = np.minimum((p.cumsum(-1) < u).sum(-1, keepdims=True), b.vocab_size - 1)
        ids = np.concatenate([ids, nxt], axis=1)
    return ids.reshape(-1)


# -- a deliberately broken quantizer ------------------------------------------------------------
@contextlib.contextmanager
def broken_weight_scales(factor: float = 1.5):
    """Every quantized layer's weight scales multiplied by `factor` after rounding (the stored scale
    no longer matches the rounded weights: dequantized weights come out `factor` times too large),
    for any scheme; restored on exit."""
    from ardeploy.calibration.weights import WeightQuantizer
    original = WeightQuantizer.layer

    def layer(self, index):
        q = original(self, index)
        tensors = dict(q.tensors)
        for name in q.weight_scales.values():
            tensors[name] = (np.asarray(tensors[name], np.float32) * factor).astype(tensors[name].dtype)
        return dataclasses.replace(q, tensors=tensors)
    WeightQuantizer.layer = layer
    try:
        yield
    finally:
        WeightQuantizer.layer = original


@contextlib.contextmanager
def broken_activation_scales(factor: float = 0.5):
    """w8a8: every activation scale multiplied by `factor` once chosen (0.5: activations clipped at
    half the calibrated threshold); restored on exit."""
    from ardeploy.calibration.quantize import Calibrator
    original = Calibrator.set_activation_scales

    def set_activation_scales(self, *args, **kw):
        original(self, *args, **kw)
        self.act_scales = {g: (np.asarray(s) * factor).astype(np.asarray(s).dtype) for g, s in self.act_scales.items()}
    Calibrator.set_activation_scales = set_activation_scales
    try:
        yield
    finally:
        Calibrator.set_activation_scales = original


BREAKAGES = {None: contextlib.nullcontext, "weight scales x1.5": broken_weight_scales,
             "activation scales x0.5": broken_activation_scales}
