"""Activation statistics: the bundle's own score graph, run in ONNX Runtime with the tensors that
feed the quantized linears added as outputs, over the calibration windows; or the statistics of
an earlier run, read back from its calibration.json (`--reuse-stats`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import evaluate as ev
from .graphs import group_inputs, stats_model
from .passes import Pass, PassRunner, hidden_name
from .source import SourceModel
from .stats import AbsHistogram
from ..runtime.errors import UserError


class StatsRun:
    """The score graph with the activations of every quantized group as outputs: per-channel
    max |x| (reduce=True, with X^T X per group when hessian=True) or the whole tensors. With a pass
    (passes.py): only the groups of its layers, on the graph cut to them."""

    def __init__(self, source: SourceModel, reduce: bool, hessian: bool = False, threads: int | None = None,
                 runner: PassRunner | None = None, p: Pass | None = None, device: str = "cpu"):
        lins = {l.param: l for l in source.quantized_linears() if p is None or p.holds(l.layer)}
        tensors = group_inputs(lins, "score")
        score = source.graphs["score"] if p is None else runner.cut(source.graphs["score"], p)
        keep = (hidden_name(p.last),) if p is not None and p.last < p.n_layers else ()
        self.model = stats_model(score, tensors, reduce, source.float_dtype, hessian, keep)
        self.session = ev.session(self.model, source.bundle.path, threads=threads, device=device) if p is None else None
        self.groups = list(tensors)
        self.outputs = [o.name for o in self.model.graph.output]

    def run(self, ids) -> list[np.ndarray]:
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        return self.session.run(self.outputs, {"input_ids": ids, "attention_mask": np.ones_like(ids)})


def collect_channel_max(source: SourceModel, windows: np.ndarray, hessians: bool = False,
                        threads: int | None = None, progress: bool = True, passes: list[Pass] | None = None,
                        after_pass=None, device: str = "cpu") -> tuple[dict, dict]:
    """(group -> per-channel max |x|, group -> X^T X summed over the windows (GPTQ; empty unless
    `hessians`)). With `passes` the graph runs a few layers at a time (passes.py), and
    `after_pass(p, chmax, xtx)` is called once each pass has been collected (it may drop what it used from
    xtx)."""
    from tqdm import tqdm
    runner = PassRunner(source, windows, threads, device)
    passes = passes or [Pass(0, source.bundle.spec["n_layers"], source.bundle.spec["n_layers"])]
    chmax: dict[str, np.ndarray] = {}
    xtx: dict[str, np.ndarray] = {}
    desc = "calibrate: channel max" + (" + Hessians" if hessians else "")
    bar = tqdm(total=len(windows) * len(passes), desc=desc, unit="window", disable=not progress, leave=False)
    for p in passes:
        stats = StatsRun(source, reduce=True, hessian=hessians, runner=runner, p=p)
        if len(passes) > 1:
            bar.set_postfix_str(str(p))
        for _, values in runner.run(p, stats.model):
            for group in stats.groups:
                v = np.asarray(values[f"calib/{group}/absmax_f32"], np.float32).reshape(-1)
                chmax[group] = v if group not in chmax else np.maximum(chmax[group], v)
                if hessians:
                    h = np.asarray(values[f"calib/{group}/xtx"], np.float32).reshape(len(v), len(v))
                    if group in xtx:
                        xtx[group] += h
                    else:
                        xtx[group] = h.copy()
            bar.update()
        values = None           # the last window's X^T X: not held while the pass's results are used
        if after_pass is not None:
            after_pass(p, chmax, xtx)
    bar.close()
    return chmax, xtx


def collect_histograms(source: SourceModel, windows: np.ndarray, smoothing: dict[str, np.ndarray],
                       threads: int | None = None, progress: bool = True, device: str = "cpu") -> dict[str, AbsHistogram]:
    """Histograms of |x| per group, of x / s where SmoothQuant divides the group's input by s."""
    from tqdm import tqdm
    stats = StatsRun(source, reduce=False, threads=threads, device=device)
    hists = {g: AbsHistogram() for g in stats.groups}
    inv = {g: (1.0 / smoothing[g]).astype(np.float32) if g in smoothing else None for g in stats.groups}
    for ids in tqdm(windows, desc="calibrate: histograms", unit="window", disable=not progress, leave=False):
        for g, v in zip(stats.groups, stats.run(ids)):
            a = np.abs(np.asarray(v, np.float32))
            if inv[g] is not None:
                a *= inv[g]
            hists[g].add(a)
    return hists


def reuse_statistics(path: str, groups, alpha: float | None, method: str) -> tuple[dict, dict | None, dict]:
    """(per-channel maxima, histograms or None, the data record) of `groups` from an earlier w8a8
    calibration.json made with the same SmoothQuant alpha."""
    try:
        old = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read calibration statistics ({e})") from None
    old_alpha = old.get("config", {}).get("smoothquant_alpha")
    if old.get("scheme") != "w8a8" or old_alpha != alpha:
        raise UserError(f"{path}: statistics are for scheme {old.get('scheme')} with SmoothQuant alpha {old_alpha}; "
                        f"re-use needs w8a8 and the same --smoothquant-alpha")
    saved = old["groups"]
    missing = [g for g in groups if g not in saved]
    if missing:
        raise UserError(f"{path}: no statistics for {missing[0]} (calibrated on another bundle?)")
    chmax = {g: np.asarray(saved[g]["channel_absmax"], np.float32) for g in groups}
    hists = None
    if all("histogram" in saved[g] for g in groups):
        hists = {g: AbsHistogram.from_json(saved[g]["histogram"]) for g in groups}
    elif method != "max":
        raise UserError(f"{path}: has no histograms (it was made with --method max); use --method max")
    return chmax, hists, dict(old.get("data", {}), reused_from=str(Path(path).resolve()))
