"""Decode step time against context length, from bench_peers.py's JSON (its --curve-tokens series).

    python scripts/plot_step_curve.py RESULTS.json [MORE.json ...] --out curve.png [--window 16]
        [--peers ours,ort-genai-graph]

One panel per JSON file (e.g. one per model shape), one line per peer that has a curve, each a
running median over --window steps (single steps are noisy). Needs matplotlib (pip install matplotlib);
it runs anywhere the JSON is, no GPU needed. Also prints each series at a few contexts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def peer_results(doc: dict) -> dict:
    """{peer: result} of one bench_peers.py JSON: peers are the entries that are results, not facts."""
    return {name: res for name, res in doc.items() if isinstance(res, dict) and ("configs" in res or "curve" in res
                                                                               or "error" in res)}


def curves(doc: dict, peers: list[str] | None = None) -> dict:
    """{peer: (contexts, step milliseconds)} for every peer with a step series."""
    out = {}
    for name, res in peer_results(doc).items():
        series = res.get("curve")
        if not series or (peers and name not in peers):
            continue
        out[name] = (np.array([c for c, _ in series]), np.array([s for _, s in series]) * 1000.0)
    return out


def running_median(values: np.ndarray, window: int) -> np.ndarray:
    return np.array([np.median(values[max(0, i - window + 1): i + 1]) for i in range(len(values))])


def title_of(doc: dict, path: Path) -> str:
    settings = doc.get("settings", {})
    machine = doc.get("machine", {})
    where = machine.get("gpu") or machine.get("cpu") or ""
    what = settings.get("shape") or Path(settings.get("hf") or settings.get("model") or path.stem).name
    return f"{what}, batch 1, {settings.get('device', 'cpu')}" + (f" ({where})" if where else "")


def summary_lines(doc: dict, peers: list[str] | None, window: int) -> list[str]:
    """Each series at about five evenly spaced contexts (running medians), for the docs' text."""
    lines = []
    for name, (ctx, ms) in curves(doc, peers).items():
        smooth = running_median(ms, window)
        picks = sorted({int(i) for i in np.linspace(window - 1, len(ctx) - 1, 5)} & set(range(len(ctx))))
        points = ", ".join(f"{ctx[i]}: {smooth[i]:.2f} ms" for i in picks)
        ratio = smooth[picks[-1]] / smooth[picks[0]] if picks else float("nan")
        lines.append(f"{name}: {points} (x{ratio:.2f})")
    return lines


def plot(docs: list[tuple[Path, dict]], out: Path, peers: list[str] | None = None, window: int = 16) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    fig, axes = plt.subplots(1, len(docs), figsize=(6.5 * len(docs), 4), squeeze=False)
    for ax, (path, doc) in zip(axes[0], docs):
        for name, (ctx, ms) in curves(doc, peers).items():
            ax.plot(ctx, running_median(ms, window), label=name)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(f"decode step (ms, running median of {window})")
        ax.set_title(title_of(doc, path), fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return f"plot written to {out}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("json", nargs="+", help="bench_peers.py --json files")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--window", type=int, default=16, help="running-median window (steps)")
    ap.add_argument("--peers", help="only these peers (comma-separated)")
    args = ap.parse_args(argv)
    if args.window < 1:
        print("plot_step_curve.py: --window must be at least 1", file=sys.stderr)
        return 2
    docs = []
    for name in args.json:
        try:
            docs.append((Path(name), json.loads(Path(name).read_text())))
        except (OSError, ValueError) as e:
            print(f"plot_step_curve.py: {name}: cannot read it as JSON ({e})", file=sys.stderr)
            return 2
    peers = [p for p in args.peers.split(",") if p] if args.peers else None
    for path, doc in docs:
        for line in summary_lines(doc, peers, args.window) or ["no peer has a step curve (run with --curve-tokens)"]:
            print(f"{path.name}: {line}")
    message = plot(docs, Path(args.out), peers, args.window)
    print(message, file=sys.stderr)
    return 0 if message.startswith("plot written") else 2


if __name__ == "__main__":
    sys.exit(main())
