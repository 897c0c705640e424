"""The memory plan (runtime/memory_plan.py, `ardeploy plan`): sizes parsed, the KV arithmetic exact,
fit_kv's refusal, and the totals against the peak RSS of a real generator (SmolLM2, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from ardeploy.cli import main
from ardeploy.runtime.bundle import Bundle
from ardeploy.runtime.errors import UserError
from ardeploy.runtime.memory_plan import fit_kv, kv_bytes_per_position, parse_bytes, plan_memory

from conftest import one_line_error

# Peak RSS (VmHWM) of a fresh process that loads the bundle, prefills `prompt` random tokens per row
# (in 256-token pieces) and decodes 16 more; its plan is printed next to it.
MEASURE = """
import json, sys, numpy as np
from ardeploy.runtime import Generator, SamplingConfig
from ardeploy.runtime.bundle import Bundle
from ardeploy.runtime.memory_plan import plan_memory
bundle, batch, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
gen = Generator.load(bundle, backend="ort", threads=2)
rows = [np.random.default_rng(r).integers(3, 40000, prompt).tolist() for r in range(batch)]
gen.generate(rows if batch > 1 else rows[0], SamplingConfig(greedy=True, max_new_tokens=16, ignore_eos=True))
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak": peak, "plan": plan_memory(Bundle.load(bundle), batch=batch).host_bytes}))
"""


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5 GiB") == 3 * 2**29
    assert parse_bytes("800MB") == 800 * 10**6
    assert parse_bytes("4096") == 4096
    for bad in ("lots", "12 parsecs", "-1GiB", "0"):
        with pytest.raises(UserError, match="--kv-budget"):
            parse_bytes(bad)


def test_fit_kv(smollm2_bundle):
    b = Bundle.load(smollm2_bundle)
    per = kv_bytes_per_position(b, 2)
    assert per == 2 * 30 * 2 * 3 * 64 * 4                    # K and V, 30 layers, batch 2, 3 KV heads of 64, fp32
    assert fit_kv(b, per * 300 + per - 1, batch=2) == 300
    assert fit_kv(b, 10 * 2**30, batch=1) == b.max_seq       # never past the bundle's max_seq
    with pytest.raises(UserError, match=r"holds 99 positions at batch 2 .* at least 100 needed: give at least"):
        fit_kv(b, per * 99, batch=2, min_seq=100)
    with pytest.raises(UserError, match="batch 3: the bundle allows 1 to 2"):
        fit_kv(b, 2**30, batch=3)
    plan = plan_memory(b, batch=2, kv_budget=per * 300)
    assert plan.max_seq == 300 and plan.kv_bytes == per * 300


@pytest.mark.slow
@pytest.mark.parametrize("batch,prompt", [(1, 16), (1, 600), (2, 600)])
def test_plan_against_measured_rss(smollm2_bundle, batch, prompt):
    """The host total within 10 % of the measured peak RSS (measured: -2.5 % to +3.9 %)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(smollm2_bundle), str(batch), str(prompt)],
                         capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(f"batch {batch}, prompt {prompt}: plan {r['plan'] / 2**20:.0f} MiB, peak RSS {r['peak'] / 2**20:.0f} MiB "
          f"({r['plan'] / r['peak'] - 1:+.1%})")
    assert abs(r["plan"] / r["peak"] - 1) <= 0.10


def test_plan_command(smollm2_bundle, capsys):
    assert main(["plan", str(smollm2_bundle), "--max-seq", "512", "--batch", "2", "--json"]) == 0
    cpu, gpu = json.loads(capsys.readouterr().out)
    assert cpu["device"] == "cpu" and gpu["device"] == "cuda" and cpu["graph"] == "decode_ort.onnx"
    assert cpu["numerics"] is None and gpu["numerics"] is None        # a float bundle: one arithmetic everywhere
    assert cpu["kv_bytes"] == 512 * kv_bytes_per_position(Bundle.load(smollm2_bundle), 2)
    assert cpu["host_bytes"] == cpu["weights_bytes"] + cpu["kv_bytes"] + cpu["activation_bytes"] + cpu["runtime_host_bytes"]
    assert gpu["device_bytes"] > gpu["kv_bytes"] + gpu["weights_bytes"] and gpu["graph"] == "decode.onnx"   # fp32: portable
    assert main(["plan", str(smollm2_bundle), "--kv-budget", "9MiB", "--device", "cpu"]) == 0
    assert "KV cache" in capsys.readouterr().out
    one_line_error(main(["plan", str(smollm2_bundle), "--kv-budget", "1KiB"]), capsys, "KV budget 1.00 KiB holds 0")
    one_line_error(main(["plan", str(smollm2_bundle), "--kv-budget", "lots"]), capsys, "--kv-budget 'lots'")
    one_line_error(main(["plan", str(smollm2_bundle), "--max-seq", "4096"]), capsys, "--max-seq 4096")


def test_importable_without_torch_or_onnxruntime():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnxruntime'] = None; "
            "import ardeploy.runtime.memory_plan as m; print(m.parse_bytes('1KiB'))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "1024"
