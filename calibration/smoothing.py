"""SmoothQuant (w8a8): per-input-channel factors s that divide a linear's input and multiply its
weight rows, moving activation outliers into the weights. The division is folded into what
produces the input, so no node is added:

    q|k|v, gate|up   the RMSNorm scale before them                 (gamma / s)
    o                the v columns of the fused q|k|v projection   (one factor per KV head and dim: GQA)
    down             the up columns of the fused gate|up projection (SwiGLU: down reads act(gate) * up)

A group whose producer is not that exact pattern in every graph is left unsmoothed (and
calibration.json says why).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .graphs import Linear, bias_of, group_inputs, linear_output, norm_weight_before, product_with, split_output
from .source import SourceModel
from .stats import smooth_factors


@dataclass(frozen=True)
class Fold:
    """Where a group's 1/s goes."""
    kind: str                          # "gamma" (RMSNorm scale), "columns" (up), "v_columns" (v)
    tensor: str                        # the tensor it is folded into
    kv_factors: np.ndarray | None = None    # v_columns: one factor per (KV head, dim)
    first_column: int = 0              # columns / v_columns: where the part starts in the fused projection


@dataclass
class Smoothing:
    factors: dict[str, np.ndarray] = field(default_factory=dict)    # group -> s over its input channels
    folds: dict[str, Fold] = field(default_factory=dict)            # group -> where 1/s is folded


class NoFold(Exception):
    """The group's input has no producer we can fold the factors into exactly (the reason)."""


def choose_smoothing(source: SourceModel, chmax: dict[str, np.ndarray], alpha: float | None,
                     record: dict[str, dict]) -> Smoothing:
    """Factors per group (not the head) from the per-channel activation maxima, and their folds;
    what was decided goes into `record` (group -> its calibration.json entry)."""
    smoothing = Smoothing()
    if alpha is None:
        return smoothing
    for group, lins in source.groups().items():
        if group == "head":
            continue
        entry = record.setdefault(group, {})
        try:
            s, fold = _factors_and_fold(source, group, lins, chmax[group], alpha)
        except NoFold as reason:
            entry["smoothquant"] = {"applied": False, "reason": str(reason)}
            continue
        smoothing.factors[group], smoothing.folds[group] = s, fold
        entry["smoothquant"] = {"applied": True, "alpha": alpha, "fold_into": fold.tensor,
                                "factors": np.round(s, 6).tolist()}
    return smoothing


def _factors_and_fold(source: SourceModel, group: str, lins: list[Linear], x: np.ndarray,
                      alpha: float) -> tuple[np.ndarray, Fold]:
    modules = {l.module: l for l in source.linears.values() if l.layer == lins[0].layer}
    kind = group.rsplit(".", 1)[1]
    wmax = np.max([np.abs(source.weight(l.param).astype(np.float32)).max(axis=l.out_axis) for l in lins], axis=0)
    if kind in ("qkv", "gate_up"):
        return smooth_factors(x, wmax, alpha), _norm_fold(source, group)
    if kind == "down" and "mlp.gate_up_proj" in modules:
        return smooth_factors(x, wmax, alpha), _up_fold(source, group, modules["mlp.gate_up_proj"])
    if kind == "o" and "self_attn.qkv_proj" in modules:
        return _v_factors_and_fold(source, modules["self_attn.qkv_proj"], x, wmax, alpha)
    raise NoFold("no producer to fold the factors into")


def _norm_fold(source: SourceModel, group: str) -> Fold:
    gammas = {norm_weight_before(m, group_inputs(source.linears, k)[group]) for k, m in source.graphs.items()}
    if None in gammas or len(gammas) != 1:
        raise NoFold("input is not an RMSNorm scale in every graph")
    return Fold("gamma", gammas.pop())


def _up_fold(source: SourceModel, group: str, gate_up: Linear) -> Fold:
    """down reads act(gate) * up, up being the second half of the gate|up projection's output."""
    ok = True
    for k, m in source.graphs.items():
        outs = {split_output(m, linear_output(m, u.node, bias_of(gate_up.param, source.inits[k])), 1)
                for u in gate_up.uses[k]}
        ok &= product_with(m, group_inputs(source.linears, k)[group], outs - {None})
    if not ok:
        raise NoFold("input is not a product with the up projection in every graph")
    return Fold("columns", gate_up.param, first_column=gate_up.shape[gate_up.out_axis] // 2)


def _v_factors_and_fold(source: SourceModel, qkv: Linear, x: np.ndarray, wmax: np.ndarray,
                        alpha: float) -> tuple[np.ndarray, Fold]:
    spec = source.bundle.spec
    nh, nkv, hd = spec["n_heads"], spec["n_kv_heads"], spec["head_dim"]
    if len(x) != nh * hd or qkv.shape[qkv.out_axis] != (nh + 2 * nkv) * hd:
        raise NoFold("o/qkv projection sizes do not match the head layout")
    # one factor per (kv head, dim): the query heads of a group share their V
    rep = nh // nkv
    xg = x.reshape(nkv, rep, hd).max(1)
    wg = wmax.reshape(nkv, rep, hd).max(1)
    sg = smooth_factors(xg.reshape(-1), wg.reshape(-1), alpha).reshape(nkv, 1, hd)
    s = np.broadcast_to(sg, (nkv, rep, hd)).reshape(-1).copy()
    return s, Fold("v_columns", qkv.param, sg.reshape(-1), first_column=(nh + nkv) * hd)


def smoothed_layer(source: SourceModel, smoothing: Smoothing,
                   layer: int | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(float32 linear weights after SmoothQuant, other tensors it changes: RMSNorm scales, biases
    of v/up projections, in their stored dtype) of one layer (None: the head). Without factors
    (w8a16, or SmoothQuant off) the weights are the stored ones."""
    lins = source.layer_linears(layer)
    rows, cols, others = _layer_folds(source, smoothing, lins)
    weights = {}
    for l in lins:
        wf = source.weight(l.param).astype(np.float32)
        if l.param in rows:
            wf = wf * np.expand_dims(rows[l.param], l.out_axis)
        if l.param in cols:
            wf = wf * np.expand_dims(cols[l.param], 1 - l.out_axis)
            b = bias_of(l.param, next(iter(source.inits.values())))
            if b:
                bv = source.weight(b)
                others[b] = (bv.astype(np.float32) * cols[l.param]).astype(bv.dtype)
        weights[l.param] = wf
    return weights, others


def _layer_folds(source: SourceModel, smoothing: Smoothing, lins: list[Linear]) -> tuple[dict, dict, dict]:
    """(param -> factor per input channel, param -> factor per output channel, RMSNorm scales
    divided by s) for the linears of one layer."""
    rows: dict[str, np.ndarray] = {}
    cols: dict[str, np.ndarray] = {}
    others: dict[str, np.ndarray] = {}
    for l in lins:
        if l.group not in smoothing.factors:
            continue
        s, fold = smoothing.factors[l.group], smoothing.folds[l.group]
        rows[l.param] = s
        if fold.kind == "gamma":
            g = source.weight(fold.tensor)
            others[fold.tensor] = (g.astype(np.float32) / s).astype(g.dtype)
        elif fold.kind in ("columns", "v_columns"):
            part = 1.0 / (s if fold.kind == "columns" else fold.kv_factors)
            cols[fold.tensor] = _part_of_columns(source.linears[fold.tensor], fold.first_column, part)
    return rows, cols, others


def _part_of_columns(lin: Linear, first: int, factors: np.ndarray) -> np.ndarray:
    """A factor per output column of a fused projection: `factors` on its part, 1 elsewhere."""
    full = np.ones(lin.shape[lin.out_axis], np.float32)
    full[first: first + len(factors)] = factors
    return full
