"""SmoothQuant (w8a8): per-input-channel factors s that divide a linear's input and multiply its
weight rows, moving activation outliers into the weights. The division is folded into what
produces the input, so no node is added:

    q/k/v, gate/up   the RMSNorm scale before them          (gamma / s)
    o                the v projection's output columns       (one factor per KV head and dim: GQA)
    down             the up projection's output columns      (SwiGLU: down reads act(gate) * up)

A group whose producer is not that exact pattern in every graph is left unsmoothed (and
calibration.json says why).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .graphs import Linear, bias_of, group_inputs, linear_output, norm_weight_before, product_with
from .source import SourceModel
from .stats import smooth_factors


@dataclass(frozen=True)
class Fold:
    """Where a group's 1/s goes."""
    kind: str                          # "gamma" (RMSNorm scale), "columns" (up), "v_columns" (v)
    tensor: str                        # the tensor it is folded into
    kv_factors: np.ndarray | None = None    # v_columns: one factor per (KV head, dim)


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
    if kind == "down" and "mlp.up_proj" in modules:
        return smooth_factors(x, wmax, alpha), _up_fold(source, group, modules["mlp.up_proj"])
    if kind == "o" and "self_attn.v_proj" in modules:
        return _v_factors_and_fold(source, modules["self_attn.v_proj"], x, wmax, alpha)
    raise NoFold("no producer to fold the factors into")


def _norm_fold(source: SourceModel, group: str) -> Fold:
    gammas = {norm_weight_before(m, group_inputs(source.linears, k)[group]) for k, m in source.graphs.items()}
    if None in gammas or len(gammas) != 1:
        raise NoFold("input is not an RMSNorm scale in every graph")
    return Fold("gamma", gammas.pop())


def _up_fold(source: SourceModel, group: str, up: Linear) -> Fold:
    ok = True
    for k, m in source.graphs.items():
        outs = {linear_output(m, u.node, bias_of(up.param, source.inits[k])) for u in up.uses[k]}
        ok &= product_with(m, group_inputs(source.linears, k)[group], outs)
    if not ok:
        raise NoFold("input is not a product with the up projection in every graph")
    return Fold("columns", up.param)


def _v_factors_and_fold(source: SourceModel, v: Linear, x: np.ndarray, wmax: np.ndarray,
                        alpha: float) -> tuple[np.ndarray, Fold]:
    spec = source.bundle.spec
    nh, nkv, hd = spec["n_heads"], spec["n_kv_heads"], spec["head_dim"]
    if len(x) != nh * hd or v.shape[v.out_axis] != nkv * hd:
        raise NoFold("o/v projection sizes do not match the head layout")
    # one factor per (kv head, dim): the query heads of a group share their V
    rep = nh // nkv
    xg = x.reshape(nkv, rep, hd).max(1)
    wg = wmax.reshape(nkv, rep, hd).max(1)
    sg = smooth_factors(xg.reshape(-1), wg.reshape(-1), alpha).reshape(nkv, 1, hd)
    s = np.broadcast_to(sg, (nkv, rep, hd)).reshape(-1).copy()
    return s, Fold("v_columns", v.param, sg.reshape(-1))


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
        elif fold.kind == "columns":
            cols[fold.tensor] = 1.0 / s
        elif fold.kind == "v_columns":
            cols[fold.tensor] = 1.0 / fold.kv_factors
    return rows, cols, others
