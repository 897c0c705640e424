"""Soak: many generated tokens through one bundle, with the process's memory and file descriptors
watched for leaks.

    python scripts/soak.py BUNDLE [--tokens 10000] [--restart-every 500] [--threads 2] [--json]

The work cycles through units: a batch of one (streamed, seeded sampling), a batch of two, a chat of
two turns (ChatSession, the second turn continuing the first's cache) and a run with stop strings;
every `--restart-every` tokens the generator is dropped and loaded again (a new Generator.load).
After each unit RSS (/proc/self/status VmRSS) and the number of open file descriptors are sampled.
The first 10 % of the samples are warm-up (in a short run, longer: until a full cycle of units has
run after the first restart); the run fails (exit 1) when RSS at the end (the median of the last
10 % of the samples) exceeds the highest warm-up sample by more than 2 %, or when any sample after
warm-up has more open descriptors than the last warm-up sample (see `growth`).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

UNITS = ("batch1", "batch2", "chat", "stop")
PROMPTS = ["The history of the river", "Write a short poem about the sea.", "def fibonacci(n):",
           "Three reasons to learn a second language are", "Once upon a time, in a small village,"]
CHAT = [("You are a helpful assistant.", "What is the capital of France?", "And what river runs through it?"),
        (None, "Give me a word that rhymes with cat.", "Use it in a sentence.")]
STOPS = [".", "\n", ","]
RSS_GROWTH_LIMIT_PCT = 2.0


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


# ONNX Runtime keeps a usage database of its own (SQLite: the file and, at times, its -wal/-shm journal
# files, opened by the library whenever it writes there): not descriptors this code opens or could leak.
ORT_USAGE_DATA = "/.onnxruntime/"


def open_fds() -> int:
    """Open descriptors, less ONNX Runtime's usage database files."""
    return len(fd_targets(listed=True))


def fd_targets(listed: bool = False):
    """What the open descriptors point at (to name the new ones when their count grows), less
    ONNX Runtime's usage database; listed=True keeps duplicates (one entry per descriptor)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:         # the listing's own descriptor, closed by now
            continue
        if ORT_USAGE_DATA not in target:
            found.append(target)
    return found if listed else set(found)


@dataclass
class Sample:
    unit: str
    tokens: int          # generated so far, all units
    seconds: float       # since the soak started
    rss_kib: int
    fds: int
    restarts: int = 0    # generator reloads before this sample


@dataclass
class SoakReport:
    bundle: str
    tokens: int
    seconds: float
    restarts: int
    units: dict = field(default_factory=dict)       # unit -> how many ran
    samples: list[Sample] = field(default_factory=list)
    new_fds: list[str] = field(default_factory=list)  # descriptors open beyond the first sample's, when seen
    first_fds: set = field(default_factory=set)

    def summary(self) -> dict:
        return {"bundle": self.bundle, "tokens": self.tokens, "seconds": round(self.seconds, 1),
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
                "restarts": self.restarts, "units": self.units, **growth(self.samples),
                "new_fds": self.new_fds[:5]}


def windows(samples: list["Sample"]) -> tuple[int, int]:
    """(warm-up samples, end-window samples). Warm-up: the first 10 %, and at least until a full cycle
    of units has run after the first restart (a fresh generator's first batch of two settles the
    allocator a step higher once); the end window: the last 10 % (at least one cycle), after warm-up."""
    n, tenth = len(samples), max(math.ceil(0.1 * len(samples)), len(UNITS))
    first_restart = next((k for k, s in enumerate(samples) if s.restarts > 0), 0)
    warm = min(n, max(tenth, first_restart + len(UNITS)))
    return warm, min(tenth, n - warm)


def growth(samples: list[Sample]) -> dict:
    """RSS and descriptor figures. RSS after warm-up is judged by the median of the end window against
    the highest warm-up sample: a restart or a batch of two moves RSS up and down by a percent or so
    (freed memory the allocator keeps a while), a leak moves the whole end up. Descriptors: any
    sample after warm-up above the last warm-up sample counts."""
    warm, n_end = windows(samples)
    head, after = samples[:warm], samples[warm:] or samples[-1:]
    end = samples[len(samples) - n_end:] if n_end else samples[-1:]
    warm_rss = max(s.rss_kib for s in head)
    end_rss = statistics.median(s.rss_kib for s in end)
    peak_rss = max(s.rss_kib for s in after)
    warm_fds, peak_fds = head[-1].fds, max(s.fds for s in after)
    mib = lambda kib: round(kib / 1024, 1)      # noqa: E731
    return {"samples": len(samples), "warmup_samples": warm, "end_samples": len(end),
            "rss_start_mib": mib(samples[0].rss_kib), "rss_warmup_mib": mib(warm_rss),
            "rss_end_median_mib": mib(end_rss), "rss_last_mib": mib(samples[-1].rss_kib),
            "rss_peak_after_warmup_mib": mib(peak_rss),
            "rss_growth_pct": round(100.0 * (end_rss - warm_rss) / warm_rss, 2),
            "rss_peak_growth_pct": round(100.0 * (peak_rss - warm_rss) / warm_rss, 2),
            "fds_start": samples[0].fds, "fds_warmup": warm_fds, "fds_max_after_warmup": peak_fds,
            "fds_end": samples[-1].fds, "fds_growth": peak_fds - warm_fds}


def problems(summary: dict, rss_limit_pct: float = RSS_GROWTH_LIMIT_PCT) -> list[str]:
    """What fails the soak (empty: it passed)."""
    found = []
    if summary["rss_growth_pct"] > rss_limit_pct:
        found.append(f"RSS grew {summary['rss_growth_pct']} % after warm-up ({summary['rss_warmup_mib']} -> "
                     f"{summary['rss_end_median_mib']} MiB, median of the last samples; limit {rss_limit_pct} %)")
    if summary["fds_growth"] > 0:
        found.append(f"open file descriptors grew by {summary['fds_growth']} after warm-up "
                     f"({summary['fds_warmup']} -> {summary['fds_max_after_warmup']})")
    return found


# -- the units of work: each returns the number of tokens it generated --------------------------
def unit_batch1(gen, i: int, n: int) -> int:
    """One prompt, streamed token by token (seeded sampling)."""
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.generator import Run
    cfg = SamplingConfig(max_new_tokens=n, temperature=0.8, top_p=0.95, seed=i)
    return sum(1 for _ in Run(gen.events([gen.encode(PROMPTS[i % len(PROMPTS)])], cfg)))


def unit_batch2(gen, i: int, n: int) -> int:
    """Two prompts of different lengths in one batch (left padding), min-p sampling and a penalty."""
    from ardeploy.runtime import SamplingConfig
    cfg = SamplingConfig(max_new_tokens=n // 2, min_p=0.05, repetition_penalty=1.1, seed=i)
    pair = [PROMPTS[i % len(PROMPTS)], PROMPTS[(i + 2) % len(PROMPTS)]]
    return sum(len(r.token_ids) for r in gen.generate(pair, cfg))


def unit_chat(gen, i: int, n: int) -> int:
    """A conversation of two turns; the second continues the cache the first left."""
    from ardeploy.runtime import ChatSession, SamplingConfig
    system, *turns = CHAT[i % len(CHAT)]
    chat, tokens = ChatSession(gen, system=system), 0
    for k, user in enumerate(turns):
        for _ in chat.turn(user, SamplingConfig(max_new_tokens=n // 2, temperature=0.7, seed=i + k)):
            pass
        tokens += len(chat.last.token_ids)
    return tokens


def unit_stop(gen, i: int, n: int) -> int:
    """A batch of two with stop strings (rows stop at different steps)."""
    from ardeploy.runtime import SamplingConfig
    cfg = SamplingConfig(max_new_tokens=n // 2, temperature=0.9, seed=i, stop=[STOPS[i % len(STOPS)], "!"])
    pair = [PROMPTS[(i + 1) % len(PROMPTS)], PROMPTS[(i + 3) % len(PROMPTS)]]
    return sum(len(r.token_ids) for r in gen.generate(pair, cfg))


RUNNERS = {"batch1": unit_batch1, "batch2": unit_batch2, "chat": unit_chat, "stop": unit_stop}


def soak(bundle, tokens: int = 10_000, restart_every: int = 500, threads: int | None = 2,
         unit_tokens: int = 48, progress=None) -> SoakReport:
    """Generate `tokens` tokens through the units in turn, restarting the generator every
    `restart_every` tokens; one Sample after each unit (after a garbage collection)."""
    from ardeploy.runtime import Generator

    def load():
        return Generator.load(bundle, threads=threads)

    report = SoakReport(bundle=str(bundle), tokens=0, seconds=0.0, restarts=0, units={u: 0 for u in UNITS})
    started, gen, next_restart, i = time.perf_counter(), load(), restart_every, 0
    while report.tokens < tokens:
        if report.tokens >= next_restart:
            gen = None                      # the old generator goes before the new one is made
            gc.collect()
            gen, report.restarts = load(), report.restarts + 1
            next_restart = (report.tokens // restart_every + 1) * restart_every
        unit = UNITS[i % len(UNITS)]
        report.tokens += RUNNERS[unit](gen, i, min(unit_tokens, max(2, tokens - report.tokens)))
        report.units[unit] += 1
        i += 1
        gc.collect()
        report.samples.append(Sample(unit, report.tokens, time.perf_counter() - started, rss_kib(), open_fds(),
                                     report.restarts))
        note_new_fds(report)
        if progress:
            progress(report.samples[-1])
    report.seconds = time.perf_counter() - started
    return report


def note_new_fds(report: SoakReport) -> None:
    """Name the descriptors a sample has beyond the first sample's (a leak, or one opened for a moment
    by a library thread): `problems` counts them, this says what they are."""
    if len(report.samples) == 1:
        report.first_fds = fd_targets()
    elif report.samples[-1].fds > report.samples[0].fds:
        extra = sorted(fd_targets() - report.first_fds)
        report.new_fds.append(f"{report.samples[-1].tokens} tokens ({report.samples[-1].unit}): {extra}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--tokens", type=int, default=10_000, help="tokens to generate in all (default 10000)")
    ap.add_argument("--restart-every", type=int, default=500, help="load the generator again every N tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unit-tokens", type=int, default=48, help="new tokens per unit of work (per batch)")
    ap.add_argument("--json", action="store_true", help="one JSON document (summary and samples) on stdout "
                    "(progress goes to stderr either way)")
    args = ap.parse_args(argv)

    def progress(s: Sample) -> None:
        print(f"{s.seconds:8.1f} s {s.tokens:6d} tokens {s.unit:7s} RSS {s.rss_kib / 1024:7.1f} MiB fds {s.fds}",
                  file=sys.stderr)

    report = soak(args.bundle, args.tokens, args.restart_every, args.threads, args.unit_tokens, progress)
    summary = summary_with_verdict(report)
    if args.json:
        print(json.dumps({**summary, "sample_log": [asdict(s) for s in report.samples]}, indent=1))
    else:
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 1 if summary["problems"] else 0


def summary_with_verdict(report: SoakReport) -> dict:
    summary = report.summary()
    summary["problems"] = problems(summary)
    return summary


if __name__ == "__main__":
    sys.exit(main())
