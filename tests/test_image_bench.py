"""scripts/bench_image.py on this CPU with a tiny model: each engine (ours and the eager PyTorch loop;
torch.compile takes minutes here) runs in its own process, the JSON holds a rate per engine and
batch, and the codes check agrees (the script the GPU runs, kept working by CI)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_image.py"


def test_bench_image_runs_on_cpu(tmp_path):
    import subprocess
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--device", "cpu", "--dtype", "fp32",
                           "--sizes", "64", "--batches", "2", "--top-k", "20", "--repeat", "1", "--threads", "2",
                           "--engines", "ours,ours-after-step,torch-eager", "--check-codes", "--work", str(tmp_path / "w"),
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    entry = report["sizes"]["64"]
    rates = {(r["engine"], row["batch"]): row["image_tokens_per_s"] for r in entry["results"] for row in r["rows"]}
    assert set(rates) == {("ours", 2), ("ours-after-step", 2), ("torch-eager", 2)}
    assert all(rate > 0 for rate in rates.values())
    assert set(entry["ratios"]) == {"ours/torch-eager batch 2", "ours/ours-after-step batch 2"}
    assert entry["codes_check"]["cpu default"]["same_codes"]
