"""Running the score graph a few decoder layers at a time, so big models calibrate in bounded memory.

Calibration runs the bundle's score graph over its windows: once for the statistics (with X^T X of
every quantized linear's input for AWQ and GPTQ) and twice for the perplexity check (FP, quantized).
Whole, that graph holds every weight at once in ONNX Runtime (on the CPU an fp16 bundle's weights are
also converted to fp32: 2.5x the file at load, measured on the Llama-3.2-1B shape) and the statistics
hold every X^T X at once (32 GB for the Llama-3-8B shape). So a model larger than `PASS_BYTES` is run
in passes: the graph is cut at the residual stream between decoder layers (`hidden.{i}`, the value
layer i reads; the exporter names it so in every graph), pass k runs layers [first, last) over every
window from the hidden states pass k-1 left, and keeps `hidden.{last}` for the next. Each pass is its
own session holding only its layers' weights, and what a pass collects (its layers' statistics) can
be used and dropped before the next one starts. The last pass also runs the head.

A model that fits runs in one pass, which is the score graph unchanged.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from . import evaluate as ev
from .graphs import prune

PASS_BYTES = 4 << 30        # what one pass may hold: its weights as ONNX Runtime's CPU provider keeps them, its X^T X


@dataclass(frozen=True)
class Pass:
    first: int          # the first decoder layer it runs
    last: int           # one past its last layer
    n_layers: int

    @property
    def whole(self) -> bool:
        return self.first == 0 and self.last == self.n_layers

    def holds(self, layer: int | None) -> bool:
        """Whether the pass runs decoder layer `layer` (None: the head, run by the last pass)."""
        return self.last == self.n_layers if layer is None else self.first <= layer < self.last

    def __str__(self) -> str:
        return "all layers" if self.whole else f"layers {self.first}-{self.last - 1}" + \
            (" and the head" if self.last == self.n_layers else "")


def layer_bytes(source, hessians: bool) -> dict[int | None, int]:
    """What one layer (None: the head) costs a pass: its weights as fp32 (ONNX Runtime's CPU provider
    runs fp16 linears in fp32 and pre-packs fp32 ones: a copy either way) and, with `hessians`, three
    X^T X of each of its groups (the graph's output in ONNX Runtime's arena, its copy in numpy, the
    sum; measured: a 4-layer Llama-3.2-1B-shape pass peaked at 5.5 GB for 1.2 GB of X^T X)."""
    cost: dict[int | None, int] = {}
    groups: set[str] = set()
    for lin in source.linears.values():
        cost[lin.layer] = cost.get(lin.layer, 0) + 4 * int(np.prod(lin.shape))
        if hessians and lin.group not in groups and (lin.layer is not None or source.quantize_head):
            groups.add(lin.group)
            k = lin.shape[1 - lin.out_axis]
            cost[lin.layer] += 3 * 4 * k * k
    return cost


def plan_passes(source, hessians: bool, layers_per_pass: int | None = None, budget: int = PASS_BYTES) -> list[Pass]:
    """Consecutive passes over the decoder layers: `layers_per_pass` each, or as many as fit `budget`
    (at least one; the last pass also holds the head, so passes are filled from the last layer back)."""
    n = source.bundle.spec["n_layers"]
    if layers_per_pass:
        return [Pass(a, min(a + layers_per_pass, n), n) for a in range(0, n, layers_per_pass)]
    cost = layer_bytes(source, hessians)
    passes, last, used = [], n, cost.get(None, 0)
    for layer in reversed(range(n)):
        c = cost.get(layer, 0)
        if layer < last - 1 and used + c > budget:
            passes.append(Pass(layer + 1, last, n))
            last, used = layer + 1, 0
        used += c
    return [Pass(0, last, n)] + passes[::-1]


def hidden_name(layer: int) -> str:
    return f"hidden.{layer}"


def cut(score: onnx.ModelProto, p: Pass, elem_type: int, width: int) -> onnx.ModelProto:
    """The score graph restricted to the layers of pass `p`: it reads hidden.{first} (unless first is 0)
    and outputs hidden.{last} (unless it is the last pass, which keeps the logits). The whole model:
    the graph itself."""
    if p.whole:
        return score
    m = copy.deepcopy(score)
    g = m.graph
    shape = ["batch", "seq", width]
    if p.last < p.n_layers:
        del g.output[:]
        g.output.append(helper.make_tensor_value_info(hidden_name(p.last), elem_type, shape))
    stop = frozenset()
    if p.first > 0:
        g.input.append(helper.make_tensor_value_info(hidden_name(p.first), elem_type, shape))
        stop = frozenset([hidden_name(p.first)])
    prune(m, stop)
    used = {i for node in g.node for i in node.input} | {o.name for o in g.output}
    kept = [i for i in g.input if i.name in used]
    del g.input[:]
    g.input.extend(kept)
    if p.first > 0 and hidden_name(p.first) not in used:
        raise ValueError(f"the score graph has no value {hidden_name(p.first)} between decoder layers")
    return m


class PassRunner:
    """Runs passes over the same windows in order, keeping each window's hidden state between them."""

    def __init__(self, source, windows: np.ndarray, threads: int | None = None, device: str = "cpu"):
        self.source, self.windows, self.threads, self.device = source, np.asarray(windows), threads, device
        self.hidden: list[np.ndarray | None] = [None] * len(self.windows)
        self.width = source.bundle.spec["hidden_size"]

    def cut(self, score: onnx.ModelProto, p: Pass) -> onnx.ModelProto:
        return cut(score, p, self.source.float_dtype, self.width)

    def run(self, p: Pass, model: onnx.ModelProto, arrays: dict[str, np.ndarray] | None = None):
        """Yields (window index, {output name: value}) for every window of pass `p`, whose graph
        `model` comes from cut() (further outputs may be added); hidden.{last} is kept, not yielded."""
        sess = ev.session(model, self.source.bundle.path, arrays=arrays, threads=self.threads, device=self.device)
        inputs = {i.name for i in sess.get_inputs()}
        outputs = [o.name for o in sess.get_outputs()]
        for i, ids in enumerate(self.windows):
            ids = np.asarray(ids, np.int64).reshape(1, -1)
            feeds = {k: v for k, v in (("input_ids", ids), ("attention_mask", np.ones_like(ids))) if k in inputs}
            if p.first > 0:
                feeds[hidden_name(p.first)] = self.hidden[i]
            values = dict(zip(outputs, sess.run(outputs, feeds)))
            if p.last < p.n_layers:
                self.hidden[i] = values.pop(hidden_name(p.last))
            yield i, values
        if p.last == p.n_layers:
            self.hidden = [None] * len(self.windows)


def perplexity_in_passes(source, plan, windows: np.ndarray, passes: list[Pass], threads: int | None = None,
                         progress: bool = True, desc: str = "eval", device: str = "cpu") -> float:
    """Perplexity of the score graph (with `plan` applied; None: the FP graph) over disjoint windows
    [n, seq_len], a pass at a time: what evaluate.perplexity computes with stride = seq_len."""
    from tqdm import tqdm
    from .graphs import quantize_graph
    runner = PassRunner(source, windows, threads, device)
    total, count = 0.0, 0
    bar = tqdm(total=len(windows) * len(passes), desc=desc, unit="window", disable=not progress, leave=False)
    for p in passes:
        model = runner.cut(source.graphs["score"], p)
        if plan is not None:
            model = quantize_graph(model, "score", source.linears, plan, ev.in_memory_initializer)
        for i, values in runner.run(p, model, plan.tensors if plan is not None else None):
            if p.last == p.n_layers:
                ids = np.asarray(runner.windows[i], np.int64)
                nll = ev.token_nll(values["logits"][0][:-1], ids[1:])
                total += float(nll.sum())
                count += len(nll)
            bar.update()
    bar.close()
    return math.exp(total / count)
