"""`ardeploy bench` on a tiny bundle: the numbers it reports are there, consistent with each other,
and the zero-copy claim (0 KV bytes copied per decode step) is measured, not assumed. Timings
themselves are not asserted: they belong to benchmarks, not tests."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ardeploy.cli.bench import bench
from ardeploy.cli import main


@pytest.fixture(scope="module")
def tiny_bundle(tiny_hf, export_once):
    folder, _ = tiny_hf("gqa_tied_llama3_bias")
    return export_once(folder, max_seq=128, max_batch=2)


def test_bench_reports_every_configuration(tiny_bundle, capsys):
    command = ["bench", str(tiny_bundle), "--prompt-len", "4,40", "--batch", "1,2", "--new-tokens", "6",
               "--repeat", "2", "--threads", "1"]
    assert main(command) == 0
    text = capsys.readouterr().out
    assert text.count("KV copied/step 0 B") == 4 and "peak RSS" in text
    assert main([*command, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)            # --json: stdout is one JSON document, nothing else
    assert [(c["batch"], c["prompt_len"]) for c in res["configs"]] == [(1, 4), (1, 40), (2, 4), (2, 40)]
    for c in res["configs"]:
        for key in ("ttft_s", "decode_tokens_per_s", "prefill_tokens_per_s", "step_s", "step_graph_s"):
            assert c[key]["min"] <= c[key]["median"] <= c[key]["max"] and c[key]["min"] > 0, key
        assert c["kv_bytes_copied_per_step"]["max"] == 0
        assert 0 <= c["overhead_fraction"]["median"] < 1
        assert c["step_graph_s"]["median"] <= c["step_s"]["median"] * 1.5
        # one record per decode step, at consecutive context lengths after the prompt
        ctx = [p for p, _ in c["step_by_context"]]
        assert ctx == list(range(c["prompt_len"], c["prompt_len"] + 5))          # past length at each step
    assert res["kv_arena_mib"] > 0 and res["memory"]["peak_rss_mib"] > res["weights_mib"]


def test_bench_counts_a_prompt_fed_in_pieces_as_prefill(tiny_bundle, monkeypatch):
    from ardeploy.runtime.backends import ort
    real = ort.OrtBackend.__init__

    def small_pieces(self, *a, **kw):
        real(self, *a, **kw)
        self.prefill_chunk = 8
    monkeypatch.setattr(ort.OrtBackend, "__init__", small_pieces)
    res = bench(tiny_bundle, prompt_lens=(40,), new_tokens=5, repeat=1, threads=1, progress=None)
    c = res["configs"][0]
    assert [p for p, _ in c["step_by_context"]] == [40, 41, 42, 43]      # the 5 prompt pieces are not steps
    assert np.isfinite(c["prefill_tokens_per_s"]["median"])


def test_bench_refuses_what_the_bundle_cannot_hold(tiny_bundle, capsys):
    assert main(["bench", str(tiny_bundle), "--prompt-len", "120", "--new-tokens", "16"]) == 2
    assert "exceeds the bundle's max_seq 128" in capsys.readouterr().err
    assert main(["bench", str(tiny_bundle), "--batch", "4"]) == 2
    assert "exceeds the bundle's max_batch 2" in capsys.readouterr().err


# -- scripts/gpu_shapes.py, scripts/bench_peers.py, scripts/plot_step_curve.py (the GPU benchmarks' CPU-testable parts)
def test_gpu_shapes_are_the_published_models(tmp_path):
    import gpu_shapes
    from transformers import AutoConfig, AutoTokenizer
    # the published parameter counts of SmolLM2-135M, Llama-3.2-1B and Llama-3-8B
    counts = {s: gpu_shapes.parameter_count(gpu_shapes.shape_config(s)) for s in gpu_shapes.SHAPES}
    assert counts == {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400, "llama-3-8b": 8_030_261_248}
    out = tmp_path / "hf"
    info = gpu_shapes.build("smollm2-135m", out, device="cpu", dtype="fp16", layers=1, log=lambda *a, **k: None)
    assert info["parameters"] == gpu_shapes.parameter_count(gpu_shapes.shape_config("smollm2-135m", layers=1))
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.rope_parameters["rope_theta"]) == \
        (1, 576, 3, 100000.0)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 49152 and tok("t5 t49151")["input_ids"] == [5, 49151] and tok.eos_token_id == 2
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["do_sample"] is False and gen["eos_token_id"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]            # no temporary folder left
    assert json.loads((out / "gpu_shape.json").read_text())["shape"] == "smollm2-135m"
    llama1b = gpu_shapes.shape_config("llama-3.2-1b")["rope_parameters"]
    assert llama1b["rope_type"] == "llama3" and llama1b["factor"] == 32.0 and llama1b["rope_theta"] == 500000.0


def test_gpu_shapes_touches_nothing_already_there(tmp_path, capsys):
    import gpu_shapes
    (tmp_path / "keep.txt").write_text("mine")
    assert gpu_shapes.main(["llama-3-8b", "--out", str(tmp_path), "--device", "cpu", "--layers", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1
    assert gpu_shapes.main(["llama-4", "--out", str(tmp_path / "x")]) == 2
    assert "unknown shape" in capsys.readouterr().err


def _args(**kw):
    import argparse
    base = dict(prompt_len=[3, 5], batch=[1], new_tokens=4, repeat=2, curve_tokens=0, threads=1, device="cpu")
    return argparse.Namespace(**{**base, **kw})


def test_bench_peers_workload_keeps_each_configuration(capsys):
    import bench_peers

    calls = []

    def generate(rows, n):
        calls.append((len(rows), len(rows[0]), n))
        if len(rows) == 4:
            raise RuntimeError("out of memory\nmore detail")
        assert len({len(r) for r in rows}) == 1 and len({tuple(r) for r in rows}) == len(rows)   # varied rows
        return 0.5, [(len(rows[0]) + i + 1, 0.01) for i in range(n - 1)]
    res = bench_peers.run_workload(_args(curve_tokens=6, device="cuda", new_tokens=5), 100, generate, batches=[1, 4, 2])
    # warm-ups (4 tokens) on the GPU: the shortest and the longest prompt, first and at each new batch size
    assert [c for c in calls if c[2] == 4] == [(1, 16, 4), (1, 5, 4), (4, 16, 4), (2, 16, 4), (2, 5, 4)]
    got = {(c["batch"], c["prompt_len"]): c for c in res["configs"]}
    assert list(got) == [(1, 3), (1, 5), (4, 3), (4, 5), (2, 3), (2, 5)]
    assert got[(4, 3)]["error"] == "warm-up: RuntimeError: out of memory"    # one line; the other batches ran
    assert got[(1, 3)]["decode_tokens_per_s"] == pytest.approx(100) and got[(2, 5)]["decode_tokens_per_s"] == pytest.approx(200)
    assert got[(2, 5)]["ttft_s"] == 0.5 and [c for c, _ in res["curve"]] == list(range(17, 22))
    emitted = [json.loads(line.split(" ", 1)[1]) for line in capsys.readouterr().err.splitlines()
               if line.startswith("@@result ")]
    assert emitted == res["configs"]                     # each configuration reached the driver as it finished


def test_bench_peers_times_ours_through_the_runtime_loop(tiny_bundle):
    import bench_peers
    res = bench_peers.worker_ours_runtime(_args(bundle=str(tiny_bundle), batch=[1, 2], prompt_len=[4], new_tokens=5,
                                                repeat=1, curve_tokens=12))
    assert [(c["batch"], c["prompt_len"]) for c in res["configs"]] == [(1, 4), (2, 4)]
    assert all(c["decode_tokens_per_s"] > 0 and c["ttft_s"] > 0 for c in res["configs"])
    assert [c for c, _ in res["curve"]] == list(range(17, 28)) and res["graph"] == "decode_ort"


def test_bench_peers_worker_failures_are_recorded():
    import sys
    import time
    import bench_peers
    record = json.dumps({"batch": 1, "prompt_len": 16, "ttft_s": 0.1, "decode_tokens_per_s": 9.0, "step_s": 0.1})
    slow = f"import sys, time; print('@@result ' + {record!r}, file=sys.stderr, flush=True); time.sleep(60)"
    started = time.perf_counter()
    res = bench_peers.run_subprocess([sys.executable, "-c", slow], 3, "slow")
    assert time.perf_counter() - started < 30
    assert res["error"].startswith("timed out after 3 s") and res["configs"][0]["decode_tokens_per_s"] == 9.0
    crash = "import warnings; raise ValueError('bad weights')\nprint('never')"
    res = bench_peers.run_subprocess([sys.executable, "-c", crash], None, "crash")
    assert res["error"] == "ValueError: bad weights" and res["configs"] == []
    assert bench_peers.last_error(["Traceback (most recent call last):", "  File x", "onnxruntime.capi.Fail: [ONNXRuntimeError] no",
                                   "warning: later"]) == "onnxruntime.capi.Fail: [ONNXRuntimeError] no"


def test_bench_peers_cuda_graph_variant_reads_the_same_files(tmp_path):
    import bench_peers
    build = tmp_path / "ort-genai"
    build.mkdir()
    (build / "model.onnx").write_bytes(b"graph")
    cfg = {"model": {"decoder": {"session_options": {"provider_options": [{"cuda": {"enable_cuda_graph": "0"}}]}}}}
    (build / "genai_config.json").write_text(json.dumps(cfg))
    variant = bench_peers.cuda_graph_variant(build)
    assert (variant / "model.onnx").samefile(build / "model.onnx")
    provider = json.loads((variant / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert provider["provider_options"] == [{"cuda": {"enable_cuda_graph": "1"}}]
    assert json.loads((build / "genai_config.json").read_text()) == cfg        # the plain build is unchanged
    with pytest.raises(RuntimeError, match="no CUDA provider"):
        bench_peers.set_cuda_graph({"model": {"decoder": {"session_options": {"provider_options": []}}}})


def test_bench_peers_end_to_end_on_the_cpu(tiny_hf, tiny_bundle, tmp_path, capsys):
    import bench_peers
    folder, _ = tiny_hf("gqa_tied_llama3_bias")
    out = tmp_path / "peers.json"
    code = bench_peers.main(["--hf", str(folder), "--bundle", str(tiny_bundle), "--peers", "ours,ort-genai-graph",
                             "--prompt-len", "4", "--new-tokens", "3", "--repeat", "1", "--threads", "1",
                             "--scratch", str(tmp_path / "scratch"), "--timeout", "240", "--json", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["ours"]["loop"] == "steps" and res["ours"]["configs"][0]["decode_tokens_per_s"] > 0
    assert res["ort-genai-graph"]["error"] == "ort-genai-graph: CUDA graphs need --device cuda"
    assert res["settings"]["peers"] == ["ours", "ort-genai-graph"] and "onnxruntime" in res["machine"]["versions"]
    assert list((tmp_path / "scratch").iterdir()) == []            # its scratch folder is gone
    assert bench_peers.main(["--device", "cuda", "--bundle", str(tiny_bundle), "--peers", "ours,transformers"]) == 2
    assert "give --hf" in capsys.readouterr().err
    assert bench_peers.main(["--bundle", str(tiny_bundle), "--peers", "ours,vllm"]) == 2
    assert "unknown peer 'vllm'" in capsys.readouterr().err


def test_plot_step_curve_summarizes_the_series(tmp_path, capsys):
    import importlib.util
    import plot_step_curve
    doc = {"settings": {"device": "cuda", "hf": "/tmp/l1/hf"}, "machine": {"gpu": "NVIDIA H200"},
           "ours": {"configs": [], "curve": [[17 + i, 0.001 * (1 + i / 50)] for i in range(200)]},
           "transformers": {"error": "timed out"}}
    (tmp_path / "r.json").write_text(json.dumps(doc))
    lines = plot_step_curve.summary_lines(doc, None, 4)
    assert lines == ["ours: 20: 1.03 ms, 69: 2.01 ms, 118: 2.99 ms, 167: 3.97 ms, 216: 4.95 ms (x4.81)"]
    code = plot_step_curve.main([str(tmp_path / "r.json"), "--out", str(tmp_path / "c.png"), "--window", "4"])
    if importlib.util.find_spec("matplotlib") is None:
        assert code == 2 and "matplotlib is not installed" in capsys.readouterr().err
    else:
        assert code == 0 and (tmp_path / "c.png").stat().st_size > 1000
