"""Quantized weights, one decoder layer at a time: SmoothQuant (or AWQ's factors) applied, then
INT8 symmetric per output channel by round-to-nearest (absmax or MSE clipping) or GPTQ rounding,
or INT4 symmetric per block (w4a16: round to nearest, AWQ clipping, GPTQ; calibration/int4.py);
and the QuantPlan of a set of layers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import head as qhead
from .graphs import QuantPlan
from .compute import NUMPY, Ops
from .int4 import Int4Weight, pack_onnx
from .smoothing import Smoothing, smoothed_layer
from .source import SourceModel
from .stats import quantize_weight


@dataclass
class QuantizedLayer:
    tensors: dict[str, np.ndarray]       # INT8 weights, their scales, tensors SmoothQuant changed
    weight_scales: dict[str, str]        # param -> its scale tensor's name
    groups: set[str]                     # activation groups of its linears
    int4_shapes: dict[str, tuple] = None     # packed INT4 weight -> logical shape (w4a16)
    head_bits: int | None = None             # w4a16 head: its bits (head.py)
    aliases: dict[str, str] = None           # tensor -> the tensor whose bytes it shares


class WeightQuantizer:
    """Quantizes layers on request and keeps them: the --keep-fp search asks for the same layer
    many times. Activation scales are not part of a layer (quant_plan adds them), so they may
    change between requests; the smoothing, method and Hessians may not."""

    def __init__(self, source: SourceModel, smoothing: Smoothing, method: str, hessians: dict[str, np.ndarray],
                 bits: int = 8, block: int | None = None, ops: Ops = NUMPY):
        self.source, self.smoothing, self.method, self.hessians = source, smoothing, method, hessians
        self.bits, self.block, self.ops = bits, block, ops
        self.done: dict[int | None, QuantizedLayer] = {}

    def layer(self, layer: int | None) -> QuantizedLayer:
        """One decoder layer (None: the head), smoothed and quantized."""
        if layer not in self.done and self.bits == 4:
            weights, tensors = smoothed_layer(self.source, self.smoothing, layer)
            self.done[layer] = self._int4_head(weights, tensors) if layer is None else self._int4_layer(weights, tensors)
        if layer not in self.done:
            weights, tensors = smoothed_layer(self.source, self.smoothing, layer)
            quantized = self._gptq(weights) if self.method == "gptq" else self._round_to_nearest(weights)
            scales, groups, aliases = {}, set(), {}
            for param, (q, s) in quantized.items():
                tensors[QuantPlan.qweight_name(param)] = q
                tensors[QuantPlan.scale_name(param)] = s
                scales[param] = QuantPlan.scale_name(param)
                groups.add(self.source.linears[param].group)
                if layer is None and self.source.linears[param].out_axis == 0:
                    aliases.update(qhead.int8_head_for_ort(param, q, s, tensors))
            self.done[layer] = QuantizedLayer(tensors, scales, groups, head_bits=8 if aliases else None,
                                              aliases=aliases)
        self.source.weights.release()
        return self.done[layer]

    def _int4_layer(self, weights: dict[str, np.ndarray], tensors: dict[str, np.ndarray]) -> QuantizedLayer:
        """Packed INT4 weights [in, out] (or [out, in] for the tied head) and their block scales."""
        scales, groups, shapes = {}, set(), {}
        for param, w in self.int4_weights(weights).items():
            lin = self.source.linears[param]
            name = QuantPlan.qweight_name(param, 4)
            tensors[name], shapes[name], tensors[QuantPlan.scale_name(param)] = \
                pack_onnx(w, lin.out_axis, self.source.float_np)
            scales[param] = QuantPlan.scale_name(param)
            groups.add(lin.group)
        return QuantizedLayer(tensors, scales, groups, shapes)

    def _int4_head(self, weights: dict[str, np.ndarray], tensors: dict[str, np.ndarray]) -> QuantizedLayer:
        """The head in blocks of head.HEAD_BITS bits (head.py); a tied table [vocab, d] also in the
        unsigned layout the ONNX Runtime graph reads (its blocked view an alias of the same bytes)."""
        bits, scales, groups, shapes, aliases = qhead.HEAD_BITS, {}, set(), {}, {}
        for param, wf in weights.items():
            lin = self.source.linears[param]
            w = qhead.quantize_head(wf if lin.out_axis == 0 else wf.T, self.block, bits, self.ops)
            name, sname = QuantPlan.qweight_name(param, bits), QuantPlan.scale_name(param)
            if bits == 4:
                tensors[name], shapes[name], tensors[sname] = pack_onnx(w, lin.out_axis, self.source.float_np)
            else:
                q, s = (w.q, w.scales) if lin.out_axis == 0 else (w.q.T, w.scales.T)
                tensors[name], tensors[sname] = np.ascontiguousarray(q), np.ascontiguousarray(s).astype(self.source.float_np)
            if lin.out_axis == 0:           # tied (or stored [vocab, d]): the ONNX Runtime graph's copy
                table, blocks = qhead.unsigned_names(param, bits)
                tensors[table] = qhead.pack_unsigned(w, bits)
                tensors[blocks] = tensors[table].reshape(w.q.shape[0], w.n_blocks, -1)
                aliases[blocks] = table
            scales[param] = sname
            groups.add(lin.group)
        return QuantizedLayer(tensors, scales, groups, shapes, bits, aliases)

    def int4_weights(self, weights: dict[str, np.ndarray]) -> dict[str, Int4Weight]:
        """param -> its INT4 weight ([out, in]) by the method: rtn (absmax / 7), awq (clipping searched
        on the group's data; its factors are already in `weights`), gptq (block scales searched on
        the weights as GPTQ leaves them) or awq-gptq (gptq on weights carrying AWQ's factors).
        Ablations for the perplexity table: rtn-mse (rtn, scales searched on the weights alone) and
        gptq-absmax (gptq with absmax / 7 scales)."""
        linears = self.source.linears
        if self.method in ("gptq", "awq-gptq", "gptq-absmax"):
            return {p: w for p, w in self._by_group(weights, self._gptq4)}
        out = {}
        for param, wf in weights.items():
            w_oi = wf.T if linears[param].out_axis == 1 else wf
            clip = 1.0
            if self.method == "awq":
                clip = self.ops.search_clip(w_oi, self.block, self._hessian(linears[param].group))
            elif self.method == "rtn-mse":
                clip = self.ops.search_clip(w_oi, self.block, None)
            out[param] = self.ops.quantize_rtn(w_oi, self.block, clip)
        return out

    def _gptq4(self, group: str, w_io: np.ndarray) -> Int4Weight:
        return self.ops.quantize_gptq(w_io, self.ops.gptq_factor(self._hessian(group)), self.block,
                                      clip=self.method != "gptq-absmax")

    def _groups(self, weights: dict[str, np.ndarray]):
        """The linears reading one input (q/k/v, gate/up) together: (group, params, their [in, out]
        matrices, each param's columns in the matrices joined side by side). GPTQ treats output channels
        independently given the input, so a group is quantized as one wider matrix (INT8 and INT4 alike)."""
        linears = self.source.linears
        by_group: dict[str, list[str]] = {}
        for param in weights:
            by_group.setdefault(linears[param].group, []).append(param)
        for group, params in by_group.items():
            cols = [weights[p] if linears[p].out_axis == 1 else weights[p].T for p in params]
            ends = np.cumsum([c.shape[1] for c in cols])
            yield group, params, cols, [slice(end - c.shape[1], end) for c, end in zip(cols, ends)]

    def _by_group(self, weights: dict[str, np.ndarray], quantize):
        """(param, Int4Weight) pairs: each group quantized as one [in, out] matrix by `quantize(group, matrix)`."""
        for group, params, cols, columns in self._groups(weights):
            w = quantize(group, np.concatenate(cols, axis=1))
            for p, c in zip(params, columns):
                yield p, Int4Weight(w.q[c].copy(), w.scales[c].copy(), w.block)

    def _round_to_nearest(self, weights: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {param: quantize_weight(wf, self.source.linears[param].out_axis, self.source.float_np, self.method)
                for param, wf in weights.items()}

    def _gptq(self, weights: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """INT8 GPTQ, a group at a time (see _groups)."""
        linears = self.source.linears
        quantized = {}
        for group, params, cols, columns in self._groups(weights):
            q, s = self.ops.gptq_quantize(np.concatenate(cols, axis=1), 1, self.ops.gptq_factor(self._hessian(group)),
                                          self.source.float_np)
            for p, c in zip(params, columns):
                quantized[p] = (np.ascontiguousarray(q[:, c] if linears[p].out_axis == 1 else q[:, c].T), s[c].copy())
        return quantized

    def _hessian(self, group: str) -> np.ndarray:
        """X^T X of the group's input as the weights see it: of X / s where SmoothQuant applies."""
        h = self.hessians[group]
        if group in self.smoothing.factors:
            inv = 1.0 / self.smoothing.factors[group]
            h = h * np.outer(inv, inv)
        return h


def quant_plan(quantizer: WeightQuantizer, layers, act_scales: dict[str, float] | None,
               progress: bool = True) -> QuantPlan:
    """Quantize `layers` (None: the head), leave the rest in FP; with `act_scales` (w8a8) their
    activations too."""
    from tqdm import tqdm
    layers = list(layers)
    todo = sum(l not in quantizer.done for l in layers)
    plan = QuantPlan(float_dtype=quantizer.source.float_dtype, bits=quantizer.bits,
                     block_size=quantizer.block if quantizer.bits == 4 else None)
    for layer in tqdm(layers, desc=f"quantize weights ({quantizer.method})", unit="layer", leave=False,
                      disable=not progress or todo < 2):
        q = quantizer.layer(layer)
        plan.tensors.update(q.tensors)
        plan.int4_shapes.update(q.int4_shapes or {})
        plan.aliases.update(q.aliases or {})
        plan.head_bits = q.head_bits or plan.head_bits
        plan.weight_scales.update(q.weight_scales)
        if act_scales is not None:
            plan.act_scales.update({g: act_scales[g] for g in q.groups})
    return plan


def smoothed_float_plan(source: SourceModel, smoothing: Smoothing, layers) -> QuantPlan:
    """SmoothQuant applied, nothing quantized: the graphs must compute what the FP bundle does
    (a test of the folding, which is exact up to float rounding)."""
    plan = QuantPlan(float_dtype=source.float_dtype)
    for layer in layers:
        weights, others = smoothed_layer(source, smoothing, layer)
        plan.tensors.update(others)
        for p, wf in weights.items():
            plan.tensors[p] = wf.astype(source.weight(p).dtype)
    return plan
