"""INT8 weights, one decoder layer at a time: SmoothQuant applied, then symmetric per-output-channel
quantization by round-to-nearest (absmax or MSE clipping) or GPTQ rounding; and the QuantPlan of
a set of layers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graphs import QuantPlan
from .smoothing import Smoothing, smoothed_layer
from .source import SourceModel
from .stats import gptq_factor, gptq_quantize, quantize_weight


@dataclass
class QuantizedLayer:
    tensors: dict[str, np.ndarray]       # INT8 weights, their scales, tensors SmoothQuant changed
    weight_scales: dict[str, str]        # param -> its scale tensor's name
    groups: set[str]                     # activation groups of its linears


class WeightQuantizer:
    """Quantizes layers on request and keeps them: the --keep-fp search asks for the same layer
    many times. Activation scales are not part of a layer (quant_plan adds them), so they may
    change between requests; the smoothing, method and Hessians may not."""

    def __init__(self, source: SourceModel, smoothing: Smoothing, method: str, hessians: dict[str, np.ndarray]):
        self.source, self.smoothing, self.method, self.hessians = source, smoothing, method, hessians
        self.done: dict[int | None, QuantizedLayer] = {}

    def layer(self, layer: int | None) -> QuantizedLayer:
        """One decoder layer (None: the head), smoothed and quantized."""
        if layer not in self.done:
            weights, tensors = smoothed_layer(self.source, self.smoothing, layer)
            quantized = self._gptq(weights) if self.method == "gptq" else self._round_to_nearest(weights)
            scales, groups = {}, set()
            for param, (q, s) in quantized.items():
                tensors[QuantPlan.qweight_name(param)] = q
                tensors[QuantPlan.scale_name(param)] = s
                scales[param] = QuantPlan.scale_name(param)
                groups.add(self.source.linears[param].group)
            self.done[layer] = QuantizedLayer(tensors, scales, groups)
        return self.done[layer]

    def _round_to_nearest(self, weights: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {param: quantize_weight(wf, self.source.linears[param].out_axis, self.source.float_np, self.method)
                for param, wf in weights.items()}

    def _gptq(self, weights: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """GPTQ treats output channels independently given the input Hessian, so the linears
        reading one input (q/k/v, gate/up) are quantized together, as one wider matrix."""
        linears = self.source.linears
        by_group: dict[str, list[str]] = {}
        for param in weights:
            by_group.setdefault(linears[param].group, []).append(param)
        quantized = {}
        for group, params in by_group.items():
            cols = [weights[p] if linears[p].out_axis == 1 else weights[p].T for p in params]    # [in, out]
            q, s = gptq_quantize(np.concatenate(cols, axis=1), 1, gptq_factor(self._hessian(group)),
                                 self.source.float_np)
            start = 0
            for p, c in zip(params, cols):
                qp, sp = q[:, start: start + c.shape[1]], s[start: start + c.shape[1]]
                start += c.shape[1]
                quantized[p] = (np.ascontiguousarray(qp if linears[p].out_axis == 1 else qp.T), sp.copy())
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
    plan = QuantPlan(float_dtype=quantizer.source.float_dtype)
    for layer in tqdm(layers, desc=f"quantize weights ({quantizer.method})", unit="layer", leave=False,
                      disable=not progress or todo < 2):
        q = quantizer.layer(layer)
        plan.tensors.update(q.tensors)
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
