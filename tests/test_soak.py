"""The soak benchmark (scripts/soak.py) in short: the same code and bounds as the full 10,000-token
run, on 300 tokens of SmolLM2 with the generator restarted every 100; and the growth rules on
made-up samples (a leak and a descriptor leak are caught, restart bounces are not)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import threads
from soak import UNITS, Sample, growth, problems

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "soak.py"


def samples_of(rss_mib: list[float], fds: list[int] | None = None) -> list[Sample]:
    fds = fds or [9] * len(rss_mib)
    return [Sample(UNITS[i % len(UNITS)], 48 * (i + 1), float(i), int(r * 1024), f, restarts=i // 10)
            for i, (r, f) in enumerate(zip(rss_mib, fds))]


def test_growth_rules():
    steady = [740, 745, 748, 750] + [750, 760, 748, 752, 770, 751, 749, 756] * 4   # restart bounces
    assert problems(growth(samples_of(steady))) == []
    leak = [740, 745, 748, 750] + [750 + 2 * i for i in range(40)]                  # 2 MiB a unit
    found = problems(growth(samples_of(leak)))
    assert len(found) == 1 and found[0].startswith("RSS grew"), found
    fds = [9] * 30 + [10] + [9] * 9                                                 # one descriptor, once
    found = problems(growth(samples_of([750] * 40, fds)))
    assert len(found) == 1 and "descriptors grew by 1" in found[0], found
    summary = growth(samples_of(steady))
    assert summary["warmup_samples"] == 14 and summary["end_samples"] == 4   # first restart at sample 10
    assert summary["rss_warmup_mib"] == 770.0 and summary["rss_end_median_mib"] == 753.5


@pytest.mark.slow
def test_short_soak(smollm2_bundle):
    """Batch 1 and 2, chat turns continuing the cache, stop strings, two restarts: RSS at the end
    within 2 % of warm-up and not one descriptor more. In a process of its own, as the script runs: the
    test process's RSS carries every earlier test's heap (in the full suite a reload there once read as
    8.5 % growth, which the same soak alone never shows)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(smollm2_bundle), "--tokens", "300", "--restart-every",
                           "100", "--threads", str(threads()), "--unit-tokens", "24", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert summary["tokens"] >= 300 and summary["restarts"] >= 2, summary
    assert all(summary["units"][unit] >= 2 for unit in UNITS), summary
    assert summary["problems"] == [] and proc.returncode == 0, {k: v for k, v in summary.items() if k != "sample_log"}
