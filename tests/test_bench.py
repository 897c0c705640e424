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
