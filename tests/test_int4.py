"""INT4 weight-only quantization (w4a16): the format and its two layouts (ONNX INT4 for the portable
graphs, MatMulNBits blobs) checked against ONNX Runtime's own kernels, the three weight methods,
a tiny model whose logits must stay close to FP32 (and a deliberately broken scale that must fail
the same bound), the bytes held, and the TensorRT-RTX build."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ardeploy.calibration import evaluate as ev
from ardeploy.calibration import int4, stats
from ardeploy.calibration.quantize import CalibConfig, calibrate_bundle
from ardeploy.runtime.bundle import Bundle
from ardeploy.runtime.errors import UserError

from conftest import threads
from quant_checks import check_ort_graph_matches_portable

IDS = np.random.default_rng(0).integers(3, 256, 64 * 16)
MODEL = "gqa8x2_untied_linear"
HEAD_GAIN = 40.0        # HF's init gives near-uniform logits; a louder head makes them peaked, so errors show
LOGIT_BOUND = 0.2       # RMS(quantized - FP logits) / std(FP logits); measured 0.09-0.13 for the four methods


def random_weight(out=24, k=80, block=32, seed=0) -> int4.Int4Weight:
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 8, (out, k)).astype(np.int8)
    s = (rng.random((out, int4.n_blocks(k, block))) * 0.1 + 0.01).astype(np.float32)
    return int4.Int4Weight(q, s, block)


def one_node_model(node, inits, k, n) -> bytes:
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    return m.SerializeToString()


def run(model: bytes, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    import onnxruntime as ort
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_layouts_round_trip_and_match_onnx_runtime():
    """K = 80 with blocks of 32: the last block is partial in both layouts."""
    w = random_weight()
    out, k = w.shape
    for axis in (0, 1):
        packed, shape, s = int4.pack_onnx(w, axis, np.float32)
        back = int4.unpack_onnx(packed, shape, s, w.block, axis)
        assert (back.q == w.q).all() and (back.scales == w.scales).all()
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    want = x @ w.dequantize().T
    # portable: INT4 [in, out] -> DequantizeLinear(axis 0, block_size) -> MatMul, unfused (the graph's arithmetic)
    packed, shape, s = int4.pack_onnx(w, 1, np.float32)
    weight = helper.make_tensor("w", TensorProto.INT4, list(shape), packed.tobytes(), raw=True)
    dq = helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=w.block)
    g = helper.make_graph([dq, helper.make_node("MatMul", ["x", "wd"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, out])],
                          [weight, numpy_helper.from_array(s, "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    np.testing.assert_allclose(run(m.SerializeToString(), x, optimize=False), want, rtol=1e-5, atol=1e-5)
    # ONNX Runtime's MatMulNBits reads the other layout
    b, sc = int4.pack_matmulnbits(w, np.float32)
    node = helper.make_node("MatMulNBits", ["x", "b", "sc"], ["y"], domain="com.microsoft", K=k, N=out, bits=4,
                            block_size=w.block, accuracy_level=0)
    got = run(one_node_model(node, [numpy_helper.from_array(b, "b"), numpy_helper.from_array(sc, "sc")], k, out), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert b.nbytes == out * int4.n_blocks(k, w.block) * w.block // 2


def test_weight_methods():
    rng = np.random.default_rng(2)
    k, n, block = 128, 48, 32
    w = rng.standard_normal((k, n)).astype(np.float32) * np.linspace(0.2, 2, n)       # [in, out]
    r = int4.quantize_rtn(w.T, block)
    assert r.q.min() >= -8 and r.q.max() <= 7 and r.scales.shape == (n, k // block)
    assert (np.abs(r.dequantize() - w.T) <= 0.5001 * int4.expand_blocks(r.scales, block, k)).all()
    # inputs with a few loud, correlated channels: AWQ and GPTQ must beat round-to-nearest on output error
    x = rng.standard_normal((4096, k)).astype(np.float32) @ rng.standard_normal((k, k)).astype(np.float32) * 0.1
    x[:, :4] *= 20
    h = x.T @ x
    base = int4.output_error(w, r.dequantize().T, h)
    g = int4.quantize_gptq(w, stats.gptq_factor(h), block)
    assert int4.output_error(w, g.dequantize().T, h) < 0.7 * base
    s, alpha, errors = int4.awq_factors(w, h, block, np.sqrt(np.diag(h)))
    assert alpha > 0 and errors[alpha] < 0.9 * errors[0.0]
    scaled = w * s[:, None]
    clip = int4.search_clip(scaled.T, block, h / np.outer(s, s))
    a = int4.quantize_rtn(scaled.T, block, clip).dequantize().T / s[:, None]
    assert int4.output_error(w, a, h) <= errors[alpha] * base * 1.0001


@pytest.fixture(scope="module")
def peaked(tmp_path_factory, tiny_hf, export_once):
    """The export tests' untied tiny model (shared export) with its head made HEAD_GAIN x louder in a
    copy of the bundle, and the fp16 tied one the calibration tests use."""
    import shutil
    src = export_once(tiny_hf(MODEL)[0], max_seq=128)
    folder = Path(shutil.copytree(src, tmp_path_factory.mktemp("peaked") / "b"))
    (head,) = [t for t in onnx.load(str(folder / "decode.onnx"), load_external_data=False).graph.initializer
               if t.name.startswith("lm_head.weight")]
    info = {e.key: e.value for e in head.external_data}
    with open(folder / info["location"], "r+b") as f:
        f.seek(int(info["offset"]))
        w = np.frombuffer(f.read(int(info["length"])), np.float32) * np.float32(HEAD_GAIN)
        f.seek(int(info["offset"]))
        f.write(w.tobytes())
    return {"fp32": folder, "fp16": export_once(tiny_hf("gqa_tied_llama3_bias")[0], max_seq=128, dtype="fp16")}


@pytest.fixture(scope="module")
def tied_peaked(tmp_path_factory, tiny_hf, export_once):
    """A tied fp32 tiny model (head and embedding one table) with that table HEAD_GAIN x louder."""
    import shutil
    src = export_once(tiny_hf("gqa_tied_llama3_bias")[0], max_seq=128)
    folder = Path(shutil.copytree(src, tmp_path_factory.mktemp("tied") / "b"))
    _scale_tensor(folder, "embed_tokens.weight", HEAD_GAIN)
    return folder


def _scale_tensor(folder: Path, name: str, factor: float, graph: str = "decode.onnx") -> None:
    (t,) = [t for t in onnx.load(str(folder / graph), load_external_data=False).graph.initializer if t.name == name]
    info = {e.key: e.value for e in t.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
    with open(folder / info["location"], "r+b") as f:
        f.seek(int(info["offset"]))
        w = np.frombuffer(f.read(int(info["length"])), dtype) * dtype.type(factor)
        f.seek(int(info["offset"]))
        f.write(w.astype(dtype).tobytes())


def _ort_logits(bundle, flavor: str = "ort") -> np.ndarray:
    from ardeploy.runtime import Generator
    backend = Generator.load(bundle, backend="ort", flavor=flavor, threads=threads()).backend
    ids = IDS[None, :24]
    first = backend.step(ids, np.ones_like(ids), arena := backend.new_arena())
    nxt = np.array([[int(first.argmax())]])
    return np.stack([first[0], backend.step(nxt, np.ones((1, 25), np.int64), arena)[0]])


HEAD_BOUND = {8: 0.03, 4: 0.25}     # RMS(logits - FP) / std(FP), head only quantized; measured 0.006 (8), 0.1 (4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_tied_head(tied_peaked, tmp_path, monkeypatch, bits):
    """--quantize-head on a tied model: the ONNX Runtime graph reads the one quantized table with
    GatherBlockQuantized (embedding) and MatMulNBits (head) -- the same bytes of weights.bin, no
    whole-table dequantize -- and gives the portable (DequantizeLinear) graph's logits, close to FP32;
    a head scale 1.5x too large fails the same bound."""
    from ardeploy.calibration import head as qhead
    monkeypatch.setattr(qhead, "HEAD_BITS", bits)
    out = tmp_path / "q"
    n = Bundle.load(tied_peaked).n_layers
    m = calibrate_bundle(tied_peaked, IDS, out, CalibConfig(scheme="w4a16", int4_weights="rtn", samples=4, seq_len=64,
                                                            check_windows=0, keep_fp=list(range(n)),
                                                            quantize_head=True, progress=False, threads=threads()))
    assert m["quantization"]["lm_head"] == m["quantization"]["embeddings"] == f"int{bits}"
    g = onnx.load(str(out / "decode_ort.onnx"), load_external_data=False).graph
    ops = {n.op_type: n for n in g.node}
    assert "DequantizeLinear" not in ops and "Gemm" not in ops
    gbq, mnb = ops["GatherBlockQuantized"], ops["MatMulNBits"]
    assert gbq.input[2] == mnb.input[2] == "embed_tokens.weight.scale"
    where = {t.name: {e.key: e.value for e in t.external_data} for t in g.initializer}
    assert where[gbq.input[0]] == where[mnb.input[1]] and gbq.input[0] != mnb.input[1]      # one tensor, two views
    assert not any(t.name == "embed_tokens.weight" for t in g.initializer)
    fp, ort_q, portable = _ort_logits(tied_peaked), _ort_logits(out), _ort_logits(out, "portable")
    assert fp.std() > 3
    np.testing.assert_allclose(ort_q, portable, atol=0.02 * float(portable.std()))   # MatMulNBits' int8 activations
    err = float(np.sqrt(np.mean((ort_q - fp) ** 2)) / fp.std())
    print("HEADERR", bits, err, float(np.abs(ort_q - portable).max() / portable.std()))
    assert err < HEAD_BOUND[bits]
    _scale_tensor(out, "embed_tokens.weight.scale", 1.5, "decode_ort.onnx")
    broken = _ort_logits(out)
    print("BROKEN", float(np.sqrt(np.mean((broken - fp) ** 2)) / fp.std()))
    assert float(np.sqrt(np.mean((broken - fp) ** 2)) / fp.std()) > HEAD_BOUND[bits]


def test_w8a16_tied_head_is_read_without_dequantizing_the_table(tied_peaked, tmp_path):
    """w8a16 --quantize-head: the ONNX Runtime graph reads the per-channel INT8 table through the same
    GatherBlockQuantized + MatMulNBits pair, each row's scale repeated over its blocks (same values), instead
    of dequantizing the whole table twice a step; logits as the portable graph's."""
    from ardeploy.calibration import head as qhead
    out = tmp_path / "q"
    calibrate_bundle(tied_peaked, IDS, out, CalibConfig(scheme="w8a16", samples=4, seq_len=64, check_windows=0,
                                                        quantize_head=True, progress=False, threads=threads()))
    g = onnx.load(str(out / "decode_ort.onnx"), load_external_data=False).graph
    readers = {n.op_type: n for n in g.node if any(i.startswith("embed_tokens.weight") for i in n.input)}
    assert set(readers) == {"GatherBlockQuantized", "MatMulNBits"}
    gbq, mnb = readers["GatherBlockQuantized"], readers["MatMulNBits"]
    assert gbq.input[2] == mnb.input[2] == qhead.blocked_scale_name("embed_tokens.weight")
    assert {a.name: a.i for a in mnb.attribute}["bits"] == 8
    where = {t.name: {e.key: e.value for e in t.external_data} for t in g.initializer}
    assert where[gbq.input[0]] == where[mnb.input[1]]                 # one table, two views
    fp, ort_q, portable = _ort_logits(tied_peaked), _ort_logits(out), _ort_logits(out, "portable")
    np.testing.assert_allclose(ort_q, portable, atol=0.02 * float(portable.std()))
    assert float(np.sqrt(np.mean((ort_q - fp) ** 2)) / fp.std()) < HEAD_BOUND[8]


def test_blocked_int8_head_rewritten_for_cuda_computes_the_same(tied_peaked, tmp_path):
    """ONNX Runtime's CUDA provider has no blocked INT8 DequantizeLinear (a w4a16 head in the portable graphs):
    sessions on the GPU get it as Cast, Reshape and Mul (runtime/cuda_compat.py). On the CPU, both graphs
    unoptimized, the rewritten one gives bit-identical logits; graphs without such a node are left alone."""
    import onnxruntime as ort
    from ardeploy.runtime.cuda_compat import blocked_int8_dequantizes
    from ardeploy.runtime.sessions import _edited, open_session, session_options
    out = tmp_path / "q"
    calibrate_bundle(tied_peaked, IDS, out, CalibConfig(scheme="w4a16", int4_weights="rtn", samples=4, seq_len=64,
                                                        check_windows=0, quantize_head=True, progress=False,
                                                        threads=threads()))
    score = out / "score.onnx"
    assert len(blocked_int8_dequantizes(onnx.load(str(score), load_external_data=False))) == 1
    for untouched in (out / "decode_ort.onnx", tied_peaked / "score.onnx"):
        assert _edited(untouched, session_options(1), "cuda", None) == untouched

    def plain_options():
        options = session_options(threads())
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return options
    options = plain_options()
    rewritten = _edited(score, options, "cuda", None)
    assert isinstance(rewritten, bytes)
    assert not blocked_int8_dequantizes(onnx.load_from_string(rewritten))
    ids = IDS[None, :32]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got = open_session(rewritten, options).run(["logits"], feeds)[0]
    want = open_session(score, plain_options()).run(["logits"], feeds)[0]
    assert want.std() > 1
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
def test_quantized_untied_head(tiny_hf, export_once, tmp_path, scheme):
    """--quantize-head on an untied model: the ONNX Runtime graph's head (x @ W^T) becomes one
    MatMulNBits over the blocked table (w8a16: its per-channel table, scales repeated per block), no
    whole-table dequantize or transpose left, the embedding untouched; its logits are the portable graph's."""
    src = export_once(tiny_hf("mha_untied_theta")[0], max_seq=128)
    out = tmp_path / "q"
    calibrate_bundle(src, IDS, out, CalibConfig(scheme=scheme, int4_weights="rtn", samples=4, seq_len=64,
                                                check_windows=0, quantize_head=True, progress=False,
                                                threads=threads()))
    g = onnx.load(str(out / "decode_ort.onnx"), load_external_data=False).graph
    readers = [n for n in g.node if any(i.startswith("lm_head.weight") for i in n.input)]
    assert [n.op_type for n in readers] == ["MatMulNBits"]
    assert readers[0].input[1] == "lm_head.weight.uint8.blocks"
    assert "GatherBlockQuantized" not in {n.op_type for n in g.node}
    ort_q, portable = _ort_logits(out), _ort_logits(out, "portable")
    np.testing.assert_allclose(ort_q, portable, atol=0.02 * float(portable.std()))


def logit_error(bundle, reference, kind: str = "score", arrays_model=None) -> float:
    x = IDS[None, 100:164]
    feeds = {"input_ids": x, "attention_mask": np.ones_like(x)}
    if kind == "decode":
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x)}
        sess_feeds = lambda s: {**feeds, **{i.name: np.zeros([0, 1] + list(i.shape[2:]), np.float32)      # noqa: E731
                                          for i in s.get_inputs() if i.name.startswith("past.")}}
    else:
        sess_feeds = lambda s: feeds                                                                       # noqa: E731
    ref_s = ev.session(Bundle.load(reference).graph_path(kind), threads=threads())
    ref = ref_s.run(["logits"], sess_feeds(ref_s))[0]
    got_s = arrays_model or ev.session(Bundle.load(bundle).graph_path(kind), threads=threads())
    got = got_s.run(["logits"], sess_feeds(got_s))[0]
    assert ref.std() > 3            # peaked: the check below can fail
    return float(np.sqrt(np.mean((got - ref) ** 2)) / ref.std())


@pytest.mark.parametrize("method", ["rtn", "awq", "gptq", "awq-gptq"])
def test_tiny_model_close_to_fp32(peaked, tmp_path, method):
    out = tmp_path / "q"
    m = calibrate_bundle(peaked["fp32"], IDS, out, CalibConfig(scheme="w4a16", int4_weights=method, samples=8,
                                                               seq_len=64, check_windows=2, keep_fp=None,
                                                               progress=False, threads=threads()))
    q = m["quantization"]
    assert q["weights"]["dtype"] == "int4" and q["weights"]["block_size"] == 32 and q["lm_head"] == "fp32"
    for kind in ("score", "decode"):
        assert logit_error(out, peaked["fp32"], kind) < LOGIT_BOUND
    g = onnx.load(str(out / "decode.onnx"), load_external_data=False).graph
    inits = {t.name: t for t in g.initializer}
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 4 * Bundle.load(out).n_layers            # q|k|v, o, gate|up, down; not the head
    for n in dq:
        attrs = {a.name: a.i for a in n.attribute}
        w = inits[n.input[0]]
        assert w.data_type == TensorProto.INT4 and attrs == {"axis": 0, "block_size": 32} and len(n.input) == 2
        assert inits[n.input[1]].dims == [w.dims[0] // 32, w.dims[1]]
        consumers = [c for c in g.node if n.output[0] in c.input]
        assert [c.op_type for c in consumers] == ["MatMul"] and consumers[0].input[1] == n.output[0]
    if method.startswith("awq"):        # AWQ's factors are folded into norms / v / up: those tensors changed
        assert any(not t.name.endswith((".int4", ".scale")) and "norm" in t.name for t in _changed(out, peaked["fp32"]))
    if method == "rtn":
        check_ort_flavor(out)


def check_ort_flavor(out):
    """The ONNX Runtime graph is carried, reads the same INT4 tensors (no second copy) and gives the
    portable graph's logits through the runtime."""
    b = Bundle.load(out)
    assert b.ort_graph == "decode_ort"
    inits = {kind: {t.name: {e.key: e.value for e in t.external_data}
                    for t in onnx.load(str(b.graph_path(kind)), load_external_data=False).graph.initializer
                    if t.name.endswith((".int4", ".scale"))} for kind in ("decode", "decode_ort")}
    assert inits["decode"] == inits["decode_ort"] and len(inits["decode"]) == 8 * b.n_layers
    check_ort_graph_matches_portable(out, IDS[None, :24], threads())


def _changed(out, source):
    from ardeploy.calibration.source import SourceWeights
    a, b = Bundle.load(out), Bundle.load(source)
    ia = {t.name: t for t in onnx.load(str(a.graph_path("decode")), load_external_data=False).graph.initializer}
    ib = {t.name: t for t in onnx.load(str(b.graph_path("decode")), load_external_data=False).graph.initializer}
    wa, wb = SourceWeights(a), SourceWeights(b)
    return [ia[n] for n in ia if n in ib and ia[n].data_location == TensorProto.EXTERNAL
            and not np.array_equal(wa.array(ia[n]), wb.array(ib[n]))]


def test_broken_scale_fails_the_bound(peaked, tmp_path):
    """The same check with every scale 1.5x too large: it must fail, or the bound above proves nothing."""
    from ardeploy.calibration.graphs import quantize_graph
    from ardeploy.calibration.quantize import Calibrator
    cal = Calibrator(Bundle.load(peaked["fp32"]), CalibConfig(scheme="w4a16", int4_weights="rtn", samples=8,
                                                              seq_len=64, check_windows=0, progress=False))
    plan = cal.quant_plan(cal.units_to_quantize(set()))
    good = quantize_graph(cal.source.graphs["score"], "score", cal.source.linears, plan, ev.in_memory_initializer)
    sess = ev.session(good, peaked["fp32"], arrays=plan.tensors, threads=threads())
    assert logit_error(None, peaked["fp32"], arrays_model=sess) < LOGIT_BOUND
    for name in plan.weight_scales.values():
        plan.tensors[name] = plan.tensors[name] * np.float32(1.5)
    sess = ev.session(good, peaked["fp32"], arrays=plan.tensors, threads=threads())
    assert logit_error(None, peaked["fp32"], arrays_model=sess) > LOGIT_BOUND


def test_int4_bytes_and_tensorrt_rtx_build(peaked, tmp_path):
    out = tmp_path / "q16"
    m = calibrate_bundle(peaked["fp16"], IDS, out, CalibConfig(scheme="w4a16", int4_weights="rtn", samples=4,
                                                               seq_len=64, check_windows=0, progress=False))
    g = onnx.load(str(out / "decode.onnx"), load_external_data=False).graph
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    lengths = {t.name: int({e.key: e.value for e in t.external_data}["length"]) for t in g.initializer
               if t.data_location == TensorProto.EXTERNAL}
    int4_bytes = sum(lengths[n.input[0]] + lengths[n.input[1]] for n in dq)
    fp16_bytes = 2 * sum(int(np.prod([d for d in t.dims])) for t in g.initializer if t.name.endswith(".int4"))
    assert int4_bytes <= 0.3 * fp16_bytes                 # 0.5 + 2/32 bytes per weight: 0.28
    assert m["weights"]["bytes"] == (out / "weights.bin").stat().st_size
    pytest.importorskip("tensorrt_rtx_bindings")
    from ardeploy.engines.builder import build_engines
    from ardeploy.runtime.errors import EngineError
    rec = build_engines(out, "int4", compute_capability=["8.9"], quiet=True)
    assert rec["precision"] == "int4" and rec["quantization"] == "w4a16" and rec["graph_dtype"] == "fp16"
    assert rec["layers"]["summary"]["CONSTANT"].get("int4") == len(dq)     # the weights stay INT4 in the network
    with pytest.raises(EngineError, match=r"quantized \(w4a16\); build it with --precision int4"):
        build_engines(out, "int8", quiet=True)


def test_bad_requests(peaked, tmp_path):
    with pytest.raises(UserError, match="--block-size 128"):
        calibrate_bundle(peaked["fp32"], IDS, tmp_path / "a", CalibConfig(scheme="w4a16", block_size=128))
    with pytest.raises(UserError, match="--block-size 24"):
        calibrate_bundle(peaked["fp32"], IDS, tmp_path / "b", CalibConfig(scheme="w4a16", block_size=24))
    with pytest.raises(UserError, match="unknown --weights"):
        calibrate_bundle(peaked["fp32"], IDS, tmp_path / "c", CalibConfig(scheme="w4a16", int4_weights="nope"))
    assert not list(tmp_path.iterdir())
