"""Static per-tensor activation scales (w8a8): a clipping threshold per group from its statistics
(of x / s where SmoothQuant applies), scale = threshold / 127 in the activations' dtype."""
from __future__ import annotations

import math

import numpy as np

from .stats import METHODS, QMAX, AbsHistogram, threshold
from ..runtime.errors import UserError


def thresholds_of(chmax: np.ndarray, hist: AbsHistogram | None, method: str, percentile: float) -> dict[str, float]:
    """Every method's threshold, for comparison in calibration.json; entropy (the slow one, and the
    worst on LLM activations) only when chosen. Without a histogram: max only."""
    out = {"max": float(chmax.max())}
    if hist is not None:
        out.update({m: threshold(hist, m, percentile) for m in METHODS
                    if m != "max" and (m != "entropy" or method == "entropy")})
    return out


def scale_of(group: str, t: float, float_np) -> float:
    """The INT8 scale of threshold `t`, rounded to the activations' dtype."""
    scale = float(float_np(t / QMAX))
    if scale == 0.0 or not math.isfinite(scale):
        raise UserError(f"{group}: activation scale {t / QMAX} does not fit {float_np.__name__}")
    return scale


def activation_scales(groups, chmax: dict[str, np.ndarray], hists: dict[str, AbsHistogram] | None,
                      factors: dict[str, np.ndarray], method: str, percentile: float, float_np,
                      record: dict[str, dict]) -> dict[str, float]:
    """group -> scale, from the per-channel maxima (divided by the SmoothQuant factors) and the
    histograms (None: --method max); the statistics and thresholds go into `record`."""
    scales = {}
    for group in groups:
        entry = record.setdefault(group, {})
        cm = chmax[group] / factors[group] if group in factors else chmax[group]
        entry["channel_absmax"] = np.round(chmax[group], 6).tolist()
        hist = hists[group] if hists is not None else None
        if hist is not None:
            entry["histogram"] = hist.to_json()
        entry["thresholds"] = thresholds = thresholds_of(cm, hist, method, percentile)
        t = thresholds[method]
        if not t > 0 or not math.isfinite(t):
            t = max(thresholds["max"], 1e-6)
        entry["threshold"] = t
        entry["scale"] = scales[group] = scale_of(group, t, float_np)
    return scales
