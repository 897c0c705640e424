"""Bad input to `ardeploy build` (and the rules that refuse a wrong engine): one clear line, exit status 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from ardeploy.cli import main
from ardeploy.engines.builder import build_engines, parse_size
from ardeploy.engines.profiles import inconsistencies, optimization_profiles
from ardeploy.runtime import engine_record
from ardeploy.runtime import trt_compat as compat
from ardeploy.runtime.backends.trt import engine_runs
from ardeploy.runtime.bundle import BundleError
from ardeploy.runtime.errors import EngineError
from bundle_copies import shadow


@pytest.fixture(scope="module")
def tiny16(tiny_hf, export_once):
    folder, _ = tiny_hf("gqa_tied_llama3_bias")
    return export_once(folder, dtype="fp16", max_seq=128, max_batch=2)


def one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ardeploy: error: "), err
    return err[0]


def test_bundle_without_graphs(tiny16, tmp_path, capsys):
    b = shadow(tiny16, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["graphs"] = {}
    (b / "manifest.json").unlink()
    (b / "manifest.json").write_text(json.dumps(m))
    assert "no graphs to build from" in one_error_line(capsys, ["build", str(b), "--precision", "fp16"])


def test_bundle_without_decode_graph(tiny16, tmp_path, capsys):
    b = shadow(tiny16, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    del m["graphs"]["decode"]
    (b / "manifest.json").unlink()
    (b / "manifest.json").write_text(json.dumps(m))
    assert "has no decode graph" in one_error_line(capsys, ["build", str(b), "--precision", "fp16"])


def test_unknown_precision(tiny16, capsys):
    with pytest.raises(EngineError, match="unknown --precision 'int3'"):
        build_engines(tiny16, "int3")
    assert "unknown --precision 'int2' (choose fp32, fp16, bf16, int8, int4)" in one_error_line(
        capsys, ["build", str(tiny16), "--precision", "int2"])
    # int8 and int4 are known, but only for a bundle made by `ardeploy calibrate`
    for precision in ("int8", "int4"):
        line = one_error_line(capsys, ["build", str(tiny16), "--precision", precision])
        assert "needs a calibrated bundle" in line and "ardeploy calibrate" in line


def test_precision_other_than_the_graphs_says_how_to_re_export(tiny16, capsys):
    line = one_error_line(capsys, ["build", str(tiny16), "--precision", "fp32"])
    assert "graphs are fp16" in line and "--dtype fp32" in line and "ardeploy export" in line


def test_max_seq_and_batch_beyond_the_bundle(tiny16, capsys):
    assert "exceeds the bundle's max_seq 128" in one_error_line(
        capsys, ["build", str(tiny16), "--precision", "fp16", "--max-seq", "4096"])
    assert "exceeds the bundle's max_batch 2" in one_error_line(
        capsys, ["build", str(tiny16), "--precision", "fp16", "--max-batch", "3"])


def test_bad_options(tiny16, capsys):
    assert "--opt-seq" in one_error_line(capsys, ["build", str(tiny16), "--precision", "fp16", "--opt-seq", "0"])
    assert "--workspace" in one_error_line(capsys, ["build", str(tiny16), "--precision", "fp16", "--workspace", "lots"])
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1e9") == 10**9


def test_not_a_bundle(tmp_path, capsys):
    assert "no such bundle folder" in one_error_line(capsys, ["build", str(tmp_path / "nope"), "--precision", "fp16"])


def test_no_tensorrt_installed_says_how_to_install(tiny16, capsys, monkeypatch):
    def missing(*a):
        raise ImportError("No module named 'tensorrt_rtx_libs'")
    monkeypatch.setattr(compat, "_import_full", missing)
    monkeypatch.setattr(compat, "_import_rtx", missing)
    line = one_error_line(capsys, ["build", str(tiny16), "--precision", "fp16"])
    assert "TensorRT is not installed" in line and "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings" in line


def test_full_tensorrt_asked_for_but_missing(tiny16, capsys, monkeypatch):
    def missing(*a):
        raise ImportError("No module named 'tensorrt'")
    monkeypatch.setattr(compat, "_import_full", missing)
    line = one_error_line(capsys, ["build", str(tiny16), "--precision", "fp16", "--trt", "tensorrt"])
    assert "tensorrt is not installed" in line and "pip install" in line


def test_rejected_onnx_op_names_node_and_op(tiny16, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx_bindings", reason="needs TensorRT-RTX's ONNX parser")
    b = shadow(tiny16, tmp_path / "b")
    model = onnx.load(str(b / "decode.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    node.op_type, node.domain = "FancySoftmax", "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    (b / "decode.onnx").unlink()
    onnx.save(model, str(b / "decode.onnx"))
    line = one_error_line(capsys, ["build", str(b), "--precision", "fp16", "--quiet"])
    assert f"node '{node.name}' (FancySoftmax)" in line and "ONNX parser rejects" in line


def test_unknown_compute_capability(tiny16, capsys):
    pytest.importorskip("tensorrt_rtx_bindings", reason="needs TensorRT-RTX")
    line = one_error_line(capsys, ["build", str(tiny16), "--precision", "fp16", "--compute-capability", "9.0"])
    assert "unknown compute capability '9.0'" in line and "8.9" in line


def test_no_engines_yet(tiny16, capsys):
    line = one_error_line(capsys, ["generate", str(tiny16), "--backend", "trt", "--prompt-ids", "1,2"])
    assert "no TensorRT engines" in line and "ardeploy build" in line
    assert "no TensorRT engines" in one_error_line(capsys, ["inspect", str(tiny16)])


# -- the refusal rules and profile arithmetic, pure ------------------------------------------------------
def test_gpu_rules():
    rtx_any = {"target": {"gpu": "any", "compute_capability": "any"}}
    rtx_some = {"target": {"gpu": "any", "compute_capability": ["8.6", "8.9"]}}
    full = {"target": {"gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}}
    engine_record.check_gpu(rtx_any, "NVIDIA H100 80GB HBM3", "9.0")       # RTX's own validity check decides
    engine_record.check_gpu(rtx_some, "NVIDIA RTX A6000", "8.6")
    engine_record.check_gpu(full, "NVIDIA GeForce RTX 4090", "8.9")
    with pytest.raises(BundleError, match="built for compute capability 8.6, 8.9; this GPU .* is 12.0"):
        engine_record.check_gpu(rtx_some, "NVIDIA GeForce RTX 5090", "12.0")
    with pytest.raises(BundleError, match="built for NVIDIA GeForce RTX 4090 .* this GPU is NVIDIA L40S"):
        engine_record.check_gpu(full, "NVIDIA L40S", "8.9")


def test_tensorrt_version_rule():
    rec = {"tensorrt": {"flavour": "tensorrt", "version": "10.13.3.9", "label": "TensorRT 10.13.3.9"}}
    engine_record.check_tensorrt(rec, "tensorrt", "10.13.3.9")
    with pytest.raises(BundleError, match="built by TensorRT 10.13.3.9 but this is TensorRT 10.3.0"):
        engine_record.check_tensorrt(rec, "tensorrt", "10.3.0")
    with pytest.raises(BundleError, match="but this is TensorRT-RTX 1.7"):
        engine_record.check_tensorrt(rec, "tensorrt_rtx", "1.7.1.116")


def test_profiles_cover_every_step_and_are_consistent():
    """Every engine run the TensorRT backend makes (engine_runs) falls inside the profile it names."""
    raw = optimization_profiles(1024, 2, 512)
    assert all(not inconsistencies(p) for p in raw)
    by_name = {p.name: p.dims for p in raw}

    def covers(name, past, seq):
        d = by_name[name]
        return (d["past_seq"][0] <= past <= d["past_seq"][2] and d["seq"][0] <= seq <= d["seq"][2]
                and past + seq <= d["total_seq"][2])
    steps = [(0, 1024), (0, 1)] + [(P, 1) for P in range(1, 1024)] + [(5, 3)]
    for past, seq in steps:
        for first, stop, name in engine_runs(past, seq):
            assert covers(name, past + first, stop - first), (past, seq, first, stop, name)
    assert [name for _, _, name in engine_runs(0, 1024)] == ["prefill"]
    assert all([name for _, _, name in engine_runs(P, 1)] == ["decode"] for P in range(1, 1024))
    assert not any(covers(name, 5, 3) for name in by_name)     # a new turn runs as one-token steps
    with pytest.raises(ValueError, match="--opt-seq"):
        optimization_profiles(64, 1, 65)


def test_compare_feeds_follow_the_profiles(tiny16):
    from ardeploy.engines.compare import compare_feeds
    from ardeploy.runtime.bundle import Bundle
    m = Bundle.load(tiny16).manifest
    cases = compare_feeds(m, prompt_len=5, decode_steps=3, max_seq=128)
    assert [(n, p) for n, p, _ in cases] == [("prefill S=5", "prefill"), ("decode P=5", "decode"),
                                             ("decode P=6", "decode"), ("decode P=7", "decode")]
    _, _, pre = cases[0]
    assert pre["input_ids"].shape == (1, 5) and pre["past.0.key"].shape == (0, 1, 2, 16)
    _, _, dec = cases[2]
    assert dec["attention_mask"].shape == (1, 7) and dec["past.1.value"].dtype == np.float16
    with pytest.raises(EngineError, match="--prompt-len"):
        compare_feeds(m, prompt_len=128, decode_steps=1)
