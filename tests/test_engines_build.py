"""TensorRT-RTX builds engines on this CPU-only machine: tiny random Llama and SmolLM2-135M, FP16 and FP32.

Each build goes into a "shadow" bundle (symbolic links to a shared test bundle's files) so the
shared bundles stay untouched. Checked: the build succeeds; every layer runs in the precision
asked for (strongly typed network report, see engines/layers.py: no GPU here, so no inspector);
the engine's I/O names, types and shapes and its profile ranges match the manifest; the plan holds
the weights once (SmolLM2: plan bytes < 1.15 x weight bytes). Nothing here runs an engine: that
needs a GPU (see test_engines_binding.py for the backend's logic without one).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13-libs "
                                                    "tensorrt-rtx-cu13-bindings)")

from ardeploy.engines import layers, profiles, record                               # noqa: E402
from ardeploy.engines.builder import PLAN_RULE, build_engines                       # noqa: E402
from ardeploy.runtime import engine_record                                          # noqa: E402
from ardeploy.runtime import trt_compat as compat                                   # noqa: E402
from ardeploy.runtime.bundle import Bundle, BundleError                             # noqa: E402
from ardeploy.runtime.files import sha256_file                                      # noqa: E402
from bundle_copies import shadow                                                    # noqa: E402

OPT_LEVEL = 0       # the cheapest builder setting; measured no slower to build and the same plan size as 3


@pytest.fixture(scope="module")
def sources(tiny_hf, export_once, request):
    def get(name):
        if name.startswith("tiny"):
            folder, _ = tiny_hf("gqa_tied_llama3_bias")
            kw = {} if name == "tiny_fp32" else {"dtype": "fp16"}
            return export_once(folder, max_seq=128, max_batch=2, **kw)
        gguf = request.getfixturevalue("smollm2_gguf")
        if name == "smollm2_fp32":
            return request.getfixturevalue("smollm2_bundle")            # max_seq 1024, max_batch 2
        return export_once(gguf, dtype="fp16", max_seq=256, score_graph=False)   # shared with test_export_smollm2
    return get


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory):
    """name -> (shadow bundle with engines/, engines.json record); each built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = shadow(sources(name), tmp_path_factory.mktemp("engines") / name)
            rec = build_engines(folder, name.split("_")[1], trt="tensorrt_rtx", opt_level=OPT_LEVEL, quiet=True)
            cache[name] = (folder, rec)
        return cache[name]
    return get


def check_engine(folder: Path, rec: dict, precision: str):
    bundle = Bundle.load(folder)
    m = bundle.manifest
    eng_dir = folder / "engines"
    assert sorted(p.name for p in eng_dir.iterdir()) == ["decode.plan", "engines.json", "layers.json"]
    assert not list(folder.glob(".engines*")), "a temporary build folder was left behind"
    assert rec == json.loads((eng_dir / "engines.json").read_text())
    assert rec["tensorrt"]["flavour"] == "tensorrt_rtx" and rec["tensorrt"]["version"] == compat.load("tensorrt_rtx").version
    assert rec["target"] == {"gpu": "any", "compute_capability": "any"}
    assert rec["precision"] == precision and rec["max_seq"] == m["max_seq"] and rec["max_batch"] == m["max_batch"]
    assert rec["graphs"] == {"decode.onnx": sha256_file(folder / "decode.onnx")}
    assert rec["plan_bytes"] == (eng_dir / "decode.plan").stat().st_size == rec["engines"][0]["bytes"]
    assert rec["build_seconds"] > 0

    # every layer in the precision asked for
    report = json.loads((eng_dir / "layers.json").read_text())
    assert report["source"] == "network" and len(report["layers"]) > 100
    assert layers.precision_problems(report, precision) == []
    kinds = layers.summary(report)
    want = record.PRECISIONS[precision]
    assert set(kinds["MATRIX_MULTIPLY"]) == {want}
    floats = {dt for counts in kinds.values() for dt in counts if dt.startswith(("float", "bfloat"))}
    assert floats == ({"float32"} if precision == "fp32" else {"float32", want})   # norms/softmax stay fp32

    # engine I/O = the manifest's decode graph
    graph = m["graphs"]["decode"]
    io = {x["name"]: x for x in rec["io"]["tensors"]}
    assert set(io) == {x["name"] for x in graph["inputs"] + graph["outputs"]}
    for side in ("inputs", "outputs"):
        for x in graph[side]:
            got = io[x["name"]]
            assert got["mode"] == side[:-1] and got["dtype"] == x["dtype"]
            assert got["shape"] == [-1 if isinstance(d, str) else d for d in x["shape"]]
    assert io["past.0.key"]["dtype"] == m["kv_dtype"] and io["logits"]["dtype"] == "float32"

    # profile ranges: prefill S 1..max_seq with no past, decode P 1..max_seq-1
    ms, mb = m["max_seq"], m["max_batch"]
    pro = {p["name"]: p for p in rec["engines"][0]["profiles"]}
    assert list(pro) == [engine_record.PREFILL, engine_record.DECODE]
    assert pro["prefill"]["dims"] == {"batch": [1, 1, mb], "seq": [1, min(512, ms), ms], "past_seq": [0, 0, 0],
                                      "total_seq": [1, min(512, ms), ms]}
    d = pro["decode"]["dims"]
    assert d["past_seq"][0] == 1 and d["past_seq"][2] == ms - 1 and d["seq"][:2] == [1, 1] and d["batch"] == [1, 1, mb]
    n_kv, hd = bundle.kv_shape
    assert pro["prefill"]["shapes"]["past.0.key"] == [[0, 1, n_kv, hd], [0, 1, n_kv, hd], [0, mb, n_kv, hd]]
    assert pro["decode"]["shapes"]["attention_mask"][2] == [mb, ms + 1]
    for p in profiles.optimization_profiles(ms, mb, min(512, ms)):
        assert not profiles.inconsistencies(p)
        assert p.to_json(graph["inputs"]) == pro[p.name]
    return bundle


@pytest.mark.parametrize("name", ["tiny_fp32", "tiny_fp16"])
def test_build_tiny(built, name):
    folder, rec = built(name)
    check_engine(folder, rec, name.split("_")[1])
    # tiny weights are 0.2 MiB: the plan's fixed part (about 5 MiB of kernels and metadata) dominates
    assert rec["plan_bytes"] < rec["weights"]["bytes"] + 8 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2_fp16", "smollm2_fp32"])
def test_build_smollm2_holds_weights_once(built, name):
    folder, rec = built(name)
    check_engine(folder, rec, name.split("_")[1])
    ratio = rec["plan_bytes"] / rec["weights"]["bytes"]
    print(f"{name}: plan {rec['plan_bytes']} B / weights {rec['weights']['bytes']} B = {ratio:.4f}, "
          f"built in {rec['build_seconds']} s")
    assert ratio < PLAN_RULE


def test_decode_graph_at_zero_past_is_the_prefill_graph(sources):
    """Why one engine suffices: the decode graph with an empty past gives the prefill graph's outputs,
    bit for bit, in ONNX Runtime (compared through polygraphy, as `ardeploy compare` does)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER
    G_LOGGER.severity = G_LOGGER.WARNING
    bundle = Bundle.load(sources("tiny_fp16"))
    n_kv, hd = bundle.kv_shape
    ids = np.random.default_rng(0).integers(3, 256, (2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0                                     # a left-padded row
    feed = {"input_ids": ids, "attention_mask": mask}
    runners = [OnnxrtRunner(SessionFromOnnx(str(bundle.graph_path("prefill"))), name="prefill")]
    dec = {**feed, **{f"past.{i}.{x}": np.zeros((0, 2, n_kv, hd), np.float16)
                      for i in range(bundle.n_layers) for x in ("key", "value")}}
    results_pre = Comparator.run(runners, data_loader=[feed])
    results_dec = Comparator.run([OnnxrtRunner(SessionFromOnnx(str(bundle.graph_path("decode"))), name="decode")],
                                 data_loader=[dec])
    results_pre["decode"] = results_dec["decode"]
    assert bool(Comparator.compare_accuracy(results_pre, compare_func=SimpleCompareFunc(atol=0.0, rtol=0.0)))


def test_inspect_command(built, capsys):
    from ardeploy.cli import main
    folder, rec = built("tiny_fp16")
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "TensorRT-RTX" in out and "profile prefill" in out and "profile decode" in out
    assert "MATRIX_MULTIPLY      float16" in out and "precision problem" not in out
    assert main(["inspect", str(folder), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["layers"]["problems"] == [] and rep["memory"]["plan_bytes"] == rec["plan_bytes"]
    assert rep["memory"]["activation_bytes_per_profile"] is None          # no GPU to ask


def test_plan_does_not_load_here_and_says_why(built):
    """On this machine TensorRT-RTX itself reports the plan cannot run (no GPU); the backend refuses
    with that reason instead of crashing in deserialization."""
    folder, rec = built("tiny_fp16")
    t = compat.load("tensorrt_rtx")
    why = compat.engine_validity(t, compat.runtime(t, compat.logger(t)), (folder / "engines" / "decode.plan").read_bytes())
    assert why is not None and why.startswith("invalid")


def test_failed_build_leaves_previous_engines(built, monkeypatch):
    folder, rec = built("tiny_fp32")
    before = (folder / "engines" / "engines.json").read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(compat, "build", boom)
    with pytest.raises(KeyboardInterrupt):
        build_engines(folder, "fp32", trt="tensorrt_rtx", quiet=True)
    assert (folder / "engines" / "engines.json").read_text() == before
    assert not list(folder.glob(".engines*"))


def test_timing_cache_is_not_used_by_tensorrt_rtx(built, sources, tmp_path, capsys):
    folder = shadow(sources("tiny_fp32"), tmp_path / "b")
    build_engines(folder, "fp32", trt="tensorrt_rtx", opt_level=OPT_LEVEL, max_seq=32, max_batch=1, opt_seq=8,
                  timing_cache=tmp_path / "t.cache")
    err = capsys.readouterr().err
    assert "no timing cache" in err and not (tmp_path / "t.cache").exists()
    rec = engine_record.load(Bundle.load(folder))
    assert rec["max_seq"] == 32 and rec["max_batch"] == 1
    assert rec["engines"][0]["profiles"][1]["dims"]["past_seq"] == [1, 8, 31]


# -- the TensorRT backend refuses engines it must not run, before touching the GPU ---------------------------
def tampered(built, tmp_path, edit) -> Path:
    folder, _ = built("tiny_fp16")
    copy = shadow(folder, tmp_path / "t")
    shutil.copytree(folder / "engines", copy / "engines")
    rec = json.loads((copy / "engines" / "engines.json").read_text())
    edit(rec, copy)
    (copy / "engines" / "engines.json").write_text(json.dumps(rec))
    return copy


def load_trt(folder):
    from ardeploy.runtime import Generator
    return Generator.load(folder, backend="trt")


def test_backend_refuses_other_tensorrt_version(built, tmp_path):
    def edit(rec, _):
        rec["tensorrt"].update(version="1.6.0.1", label="TensorRT-RTX 1.6.0.1")
    with pytest.raises(BundleError, match=r"built by TensorRT-RTX 1\.6\.0\.1 but this is TensorRT-RTX 1\.7"):
        load_trt(tampered(built, tmp_path, edit))


def test_backend_refuses_other_graphs(built, tmp_path):
    def edit(rec, copy):
        (copy / "decode.onnx").unlink()
        shutil.copy(built("tiny_fp32")[0] / "decode.onnx", copy / "decode.onnx")
    with pytest.raises(BundleError, match="built from another decode.onnx"):
        load_trt(tampered(built, tmp_path, edit))


def test_backend_refuses_other_weights(built, tmp_path):
    def edit(rec, _):
        rec["source_sha256"] = {"model.safetensors": "0" * 64}
    with pytest.raises(BundleError, match="other weights"):
        load_trt(tampered(built, tmp_path, edit))


def test_backend_needs_a_gpu_here(built, capsys):
    """Valid engines on a machine without a GPU (or cuda-python): one clear line from the CLI."""
    from ardeploy.cli import main
    folder, _ = built("tiny_fp16")
    assert main(["generate", str(folder), "--backend", "trt", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("cuda-python" in err[0] or "NVIDIA GPU" in err[0])


def test_compare_needs_a_gpu_here(built, capsys):
    from ardeploy.cli import main
    folder, _ = built("tiny_fp16")
    assert main(["compare", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NVIDIA GPU" in err[0]
