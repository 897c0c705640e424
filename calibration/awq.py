"""AWQ's per-input-channel factors for w4a16 (Lin et al., 2023), folded like SmoothQuant's.

Weights of input channels that carry large activations matter most; scaling those weight rows up
by s before INT4 rounding (and the activation down by s) shrinks their relative rounding error.
The division of the activation is folded where SmoothQuant folds it (smoothing.py: the RMSNorm
scale before q|k|v and gate|up, the v columns before o, the up columns before down), so the graph
stays a plain blocked DequantizeLinear -> MatMul and the float graph is unchanged (tested).

s = rms(x)^alpha per input channel (rms from the diagonal of X^T X, the statistics GPTQ collects
too), alpha searched per group on the output error tr(E^T H E) over the calibration data. Within a
layer, down is decided before gate|up and o before q|k|v, because their folds change the up and v
columns that gate|up and q|k|v then quantize.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .compute import NUMPY, Ops
from .smoothing import NoFold, Smoothing, _factors_and_fold, _part_of_columns
from .source import SourceModel

ORDER = ("down", "o", "gate_up", "qkv")


def awq_smoothing(source: SourceModel, hessians: dict[str, np.ndarray], block: int, record: dict[str, dict],
                  progress: bool = True, layers: list[int] | None = None, into: Smoothing | None = None,
                  ops: Ops = NUMPY) -> Smoothing:
    """Factors and folds of every decoder group (the head is never scaled: the tied embedding
    table would change) of `layers` (default: all), added to `into` (default: a new Smoothing);
    what was decided goes into `record` (group -> calibration.json entry); `ops`: where the arithmetic
    runs (compute.py)."""
    from tqdm import tqdm
    smoothing, groups = into if into is not None else Smoothing(), source.groups()
    layers = source.layers if layers is None else layers
    for layer in tqdm(layers, desc="AWQ scales", unit="layer", disable=not progress or len(layers) < 2, leave=False):
        columns: dict[str, np.ndarray] = {}        # param -> factor per output column, from folds decided
        for kind in ORDER:
            group = f"layers.{layer}.{kind}"
            if group not in groups or group not in hessians:
                continue
            entry = record.setdefault(group, {})
            try:
                s, fold, alpha, errors = _group_factors(source, group, groups[group], hessians[group], block, columns,
                                                        ops)
            except NoFold as reason:
                entry["awq"] = {"applied": False, "reason": str(reason)}
                continue
            smoothing.factors[group], smoothing.folds[group] = s, fold
            if fold.kind != "gamma":
                part = 1.0 / (s if fold.kind == "columns" else fold.kv_factors)
                columns[fold.tensor] = _part_of_columns(source.linears[fold.tensor], fold.first_column, part)
            entry["awq"] = {"applied": True, "alpha": alpha, "fold_into": fold.tensor,
                            "error_by_alpha": errors, "factors": np.round(s, 5).tolist()}
        source.weights.release()
    return smoothing


def _group_factors(source: SourceModel, group: str, lins, hessian: np.ndarray, block: int,
                   columns: dict[str, np.ndarray], ops: Ops = NUMPY):
    """(s over the group's input channels, its fold, alpha, alpha -> relative error)."""
    rms = np.sqrt(np.maximum(np.diag(hessian), 0.0))
    fold = _factors_and_fold(source, group, lins, rms, 0.5)[1]          # where s goes (raises NoFold)
    cols = []
    for l in lins:
        w = source.weight(l.param).astype(np.float32)
        w = w if l.out_axis == 1 else w.T                                   # [in, out]
        if l.param in columns:
            w = w * columns[l.param][None, :]
        cols.append(w)
    w_io = np.concatenate(cols, axis=1)
    expand = None
    if fold.kind == "v_columns":        # o: a KV group's query heads share their V: one factor per (kv head, dim)
        spec = source.bundle.spec
        nkv, rep, hd = spec["n_kv_heads"], spec["n_heads"] // spec["n_kv_heads"], spec["head_dim"]
        rms = np.sqrt(np.mean(rms.reshape(nkv, rep, hd) ** 2, axis=1)).reshape(-1)

        def expand(v):
            return np.broadcast_to(v.reshape(nkv, 1, hd), (nkv, rep, hd)).reshape(-1).copy()
    s, alpha, errors = ops.awq_factors(w_io, hessian.astype(np.float32), block, rms, expand)
    if fold.kind == "v_columns":
        fold = dataclasses.replace(fold, kv_factors=s.reshape(nkv, -1, hd)[:, 0, :].reshape(-1).copy())
    return s, fold, alpha, errors
