"""w8a8 on x86: the same exact int8 products on every CPU.

CPUs without VNNI (AVX2 only: Zen 1-3, Haswell to Comet Lake; AVX-512 without VNNI: Skylake-SP) multiply
uint8 activations by int8 weights with VPMADDUBSW, whose pair sums saturate at int16: on an AVX2-only
EPYC the w8a8 decode graph of the tiny peaked model measured KL 0.0143 to FP32 against 0.0007 on a VNNI
CPU (the test_calibration.py bound is 0.003), and SmolLM2's perplexity 1.038x against 1.018x. Every
session the runtime and calibration make sets session.x64quantprecision for w8a8 graphs (runtime/sessions.py), which has
ONNX Runtime store those weights as uint8 (w + 128) and run its uint8 x uint8 kernels, exact on every
x86 CPU (only for fp32 graphs with int8 activations whose int8 weights all feed MatMul/Gemm: a weight that
also feeds a Gather -- a tied int8 head -- or stays unfused -- w8a16, fp16 w8a8 -- ONNX Runtime would
convert too and then refuse its zero point; tested below). Here: the entry is set for w8a8 graphs and only
for them, it does convert the weights, and on a VNNI CPU (exact already) it changes no logit. That the AVX2 result now equals the VNNI one follows from both being exact integer products;
on an AVX2-only runner test_calibration.py's decode-graph test is the check."""
from __future__ import annotations

import json
import platform
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from ardeploy.calibration.quantize import CalibConfig, calibrate_bundle
from ardeploy.runtime.sessions import EXACT_INT8_ON_X86, session_options

X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


@pytest.fixture(scope="module")
def w8a8(tiny_hf, export_once, tmp_path_factory):
    src = export_once(tiny_hf("gqa8x2_untied_linear")[0], max_seq=128)
    out = tmp_path_factory.mktemp("w8a8") / "q"
    ids = np.random.default_rng(0).integers(3, 256, 64 * 10)
    calibrate_bundle(src, ids, out, CalibConfig("w8a8", samples=8, seq_len=64, check_windows=0, keep_fp=None,
                                                progress=False))
    return out


def run(bundle: Path, entry: str, tmp_path: Path):
    """(logits of 40 tokens, element types of the int8 GEMMs' weights after ONNX Runtime's optimizer)."""
    import onnxruntime as ort
    options = session_options(threads=2, warnings=False)
    options.add_session_config_entry(EXACT_INT8_ON_X86[0], entry)      # the later entry wins
    options.optimized_model_filepath = str(tmp_path / f"opt{entry}.onnx")
    sess = ort.InferenceSession(str(bundle / "score.onnx"), options, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(3, 256, (1, 40))
    logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    model = onnx.load(options.optimized_model_filepath, load_external_data=False)
    inits = {t.name: t.data_type for t in model.graph.initializer}
    weight = {"MatMulIntegerToFloat": 1, "MatMulInteger": 1, "QLinearMatMul": 3, "DynamicQuantizeMatMul": 1}
    types = Counter(onnx.TensorProto.DataType.Name(inits[n.input[weight[n.op_type]]])
                    for n in model.graph.node if n.op_type in weight and n.input[weight[n.op_type]] in inits)
    return logits, types


def test_only_w8a8_graphs_ask_for_exact_int8(w8a8, tiny_hf, export_once, tmp_path):
    from ardeploy.calibration import evaluate as ev
    from ardeploy.runtime.sessions import ask_exact_int8, wants_exact_int8
    fp = export_once(tiny_hf("gqa8x2_untied_linear")[0], max_seq=128)
    assert wants_exact_int8(w8a8 / "decode.onnx") and not wants_exact_int8(fp / "decode.onnx")
    assert json.loads((w8a8 / "manifest.json").read_text())["quantization"]["activations"][
        "x86_int8_products"].startswith("exact")
    seen = []
    real = ev.open_session
    ev.open_session = lambda model, options, *a, **k: (seen.append(options), real(model, options, *a, **k))[1]
    try:
        ev.session(onnx.load(str(w8a8 / "score.onnx"), load_external_data=False), w8a8)
        ev.session(onnx.load(str(fp / "score.onnx"), load_external_data=False), fp)
    finally:
        ev.open_session = real
    assert seen[0].get_session_config_entry(EXACT_INT8_ON_X86[0]) == "1"
    with pytest.raises(Exception):
        seen[1].get_session_config_entry(EXACT_INT8_ON_X86[0])
    options = session_options()
    ask_exact_int8(options)
    ask_exact_int8(options)                 # once only (ONNX Runtime would warn)
    assert options.get_session_config_entry(EXACT_INT8_ON_X86[0]) == "1"


@pytest.mark.skipif(not X86, reason="x86 only: elsewhere ONNX Runtime compiles the entry out")
def test_w8a8_weights_become_uint8_and_vnni_logits_do_not_move(w8a8, tmp_path):
    exact, exact_types = run(w8a8, "1", tmp_path)
    plain, plain_types = run(w8a8, "0", tmp_path)
    print(f"int8 GEMM weights: {dict(plain_types)} without the entry, {dict(exact_types)} with it; "
          f"CPU: {'VNNI' if {'avx512_vnni', 'avx_vnni'} & cpu_flags() else 'no VNNI'}")
    assert sum(plain_types.values()) >= 8 and set(plain_types) == {"INT8"}
    assert exact_types == Counter({"UINT8": sum(plain_types.values())})
    if {"avx512_vnni", "avx_vnni"} & cpu_flags():
        assert np.array_equal(exact, plain)          # VNNI: exact either way


@pytest.mark.skipif(not X86, reason="x86 only: elsewhere ONNX Runtime compiles the entry out")
def test_not_asked_where_onnx_runtime_would_break_the_graph(tiny_hf, export_once, tmp_path):
    """A tied int8 head (w8a8 --quantize-head): the table's DequantizeLinear also feeds the embedding's
    Gather; with the entry ONNX Runtime converts the table anyway and that node fails. So it is not asked for,
    and the manifest says the CPU's own kernels run it."""
    from ardeploy.runtime.sessions import wants_exact_int8
    src = export_once(tiny_hf("gqa_tied_llama3_bias")[0], max_seq=128)
    out = tmp_path / "q"
    m = calibrate_bundle(src, np.random.default_rng(0).integers(3, 256, 64 * 10), out, CalibConfig(
        "w8a8", samples=8, seq_len=64, check_windows=0, keep_fp=None, progress=False, quantize_head=True))
    assert not wants_exact_int8(out / "score.onnx")
    assert m["quantization"]["activations"]["x86_int8_products"].startswith("the CPU's own")
    with pytest.raises(Exception, match="zero_point"):
        run(out, "1", tmp_path)
