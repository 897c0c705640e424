"""Find the linear layers of exported graphs and write Q/DQ into them.

Every graph of a bundle (prefill, decode, score) refers to a weight by the same initializer name
(`layers.3.mlp.down_proj.weight.T`, stored `[in, out]` and used by MatMul; the head uses
`embed_tokens.weight` / `lm_head.weight`, `[out, in]`, through Gemm transB or Transpose). A linear
layer is therefore identified by its weight name, not by node or value names (those differ
between graphs), and whatever we decide for a weight (scales, smoothing) is applied identically in
every graph.

Q/DQ placement follows TensorRT's explicit-quantization rules, so the builder fuses each pair into
an INT8 GEMM:

    weight:      int8 [in,out] -> DequantizeLinear(scale [out], axis=1) -> MatMul input B
    activation:  x -> QuantizeLinear(scale, zp=0 int8) -> DequantizeLinear -> MatMul input A   (w8a8)

    INT4 weight (w4a16): int4 [in,out] (two per byte) -> DequantizeLinear(scale [in/block, out], axis=0,
                 block_size) -> MatMul input B     (TensorRT's weight-only INT4 pattern; ONNX Runtime's
                 CPU provider rewrites it into MatMulNBits)

Scales are symmetric (zero point 0), per output channel (INT8) or per block of input channels
(INT4) for weights and per tensor for activations, in the graph's activation dtype. One
QuantizeLinear per activation tensor; one DequantizeLinear per consumer (the q/k/v projections
share their input and its scale).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.errors import UserError

LAYER_WEIGHT = re.compile(r"^layers\.(\d+)\.(.+)\.weight(\.T)?$")
HEAD_WEIGHTS = ("lm_head.weight", "embed_tokens.weight")
# Modules whose linears read the same activation; the group names the activation.
GROUP_OF_MODULE = {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_up_proj": "gate_up",
                   "mlp.down_proj": "down"}
NP_OF_ONNX = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


@dataclass
class LinearUse:
    node: str            # node name in this graph
    act: str             # activation input (A) value name in this graph


@dataclass
class Linear:
    param: str           # stored initializer name
    layer: int | None    # decoder layer, None for the LM head
    module: str          # e.g. self_attn.qkv_proj, lm_head
    group: str           # activation group, e.g. layers.3.qkv or head
    out_axis: int        # output-channel axis of the stored 2-D tensor
    shape: tuple
    uses: dict[str, list[LinearUse]] = field(default_factory=dict)     # graph kind -> uses


def initializer_map(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_linears(graphs: dict[str, onnx.ModelProto]) -> dict[str, Linear]:
    """Linear layers (MatMul/Gemm with a stored 2-D weight) of every graph, keyed by weight name."""
    found: dict[str, Linear] = {}
    for kind, model in graphs.items():
        inits = initializer_map(model)
        prod = producers(model)
        for node in model.graph.node:
            weight = _stored_weight(node, inits, prod)
            place = _place_of(weight[0]) if weight else None
            if place is None:
                continue
            b, out_axis = weight
            lin = found.get(b)
            if lin is None:
                lin = found[b] = Linear(b, *place, out_axis, tuple(inits[b].dims))
            elif lin.out_axis != out_axis:
                raise ValueError(f"{b}: used with different layouts in different graphs")
            lin.uses.setdefault(kind, []).append(LinearUse(node.name, node.input[0]))
    for lin in found.values():
        if set(lin.uses) != set(graphs):
            missing = sorted(set(graphs) - set(lin.uses))
            raise ValueError(f"{lin.param}: not used as a linear weight in graph(s) {', '.join(missing)}")
    return found


def _stored_weight(node: onnx.NodeProto, inits: dict[str, TensorProto],
                   prod: dict[str, onnx.NodeProto]) -> tuple[str, int] | None:
    """(initializer name, output-channel axis) of the 2-D weight a MatMul/Gemm multiplies by,
    directly or through a Transpose; None for anything else."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    b, out_axis = node.input[1], 1
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            return None
        out_axis = 0 if _attr(node, "transB", 0) else 1
    if b not in inits:
        t = prod.get(b)
        if t is None or t.op_type != "Transpose" or list(_attr(t, "perm", [1, 0])) != [1, 0] \
                or t.input[0] not in inits:
            return None             # activation x activation (attention) or something we do not own
        b, out_axis = t.input[0], 1 - out_axis
    return (b, out_axis) if len(inits[b].dims) == 2 else None


def _place_of(weight: str) -> tuple[int | None, str, str] | None:
    """(decoder layer or None for the head, module, activation group) of a weight name we quantize."""
    m = LAYER_WEIGHT.match(weight)
    if m:
        layer, module = int(m.group(1)), m.group(2)
        return layer, module, f"layers.{layer}.{GROUP_OF_MODULE.get(module, module)}"
    if weight in HEAD_WEIGHTS or weight.removesuffix(".T") in HEAD_WEIGHTS:
        return None, "lm_head", "head"
    return None


def group_inputs(linears: dict[str, Linear], kind: str) -> dict[str, str]:
    """Activation group -> the one value name all its linears read in graph `kind`."""
    out: dict[str, str] = {}
    for lin in linears.values():
        for use in lin.uses[kind]:
            prev = out.setdefault(lin.group, use.act)
            if prev != use.act:
                raise ValueError(f"{kind}: linears of group {lin.group} read different tensors ({prev}, {use.act})")
    return out


def norm_weight_before(model: onnx.ModelProto, value: str) -> str | None:
    """If `value` is `Mul(x, gamma)` with gamma a 1-D initializer (an RMSNorm's scale), gamma's name."""
    node = producers(model).get(value)
    inits = initializer_map(model)
    if node is None or node.op_type != "Mul":
        return None
    cands = [i for i in node.input if i in inits and len(inits[i].dims) == 1]
    return cands[0] if len(cands) == 1 else None


def product_with(model: onnx.ModelProto, value: str, linear_outputs: set[str]) -> bool:
    """True when `value` = Mul(something, one of `linear_outputs`) (SwiGLU's up branch)."""
    node = producers(model).get(value)
    return node is not None and node.op_type == "Mul" and any(i in linear_outputs for i in node.input)


def linear_output(model: onnx.ModelProto, node_name: str, bias: str | None) -> str:
    """Value name of a linear's result, after its bias Add if it has one."""
    node = next(n for n in model.graph.node if n.name == node_name)
    out = node.output[0]
    if bias:
        for n in model.graph.node:
            if n.op_type == "Add" and out in n.input and bias in n.input:
                return n.output[0]
    return out


def split_output(model: onnx.ModelProto, value: str, index: int) -> str | None:
    """Output `index` of the Split that `value` feeds (a fused projection's part), if there is one."""
    for node in model.graph.node:
        if node.op_type == "Split" and node.input[0] == value and len(node.output) > index:
            return node.output[index]
    return None


def bias_of(param: str, inits: dict[str, TensorProto]) -> str | None:
    if param.endswith(".weight.T"):
        name = param[: -len(".weight.T")] + ".bias"
    elif param.endswith(".weight"):
        name = param[: -len(".weight")] + ".bias"
    else:
        return None
    return name if name in inits else None


def activation_dtype(model: onnx.ModelProto, linears: dict[str, Linear]) -> int:
    inits = initializer_map(model)
    dts = {inits[p].data_type for p in linears if p in inits}
    if len(dts) != 1:
        raise UserError(f"linear weights have mixed dtypes {sorted(dts)}")
    dt = dts.pop()
    if dt not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
        raise UserError(f"linear weights have dtype {TensorProto.DataType.Name(dt)}; expected a float type "
                        f"(is this bundle already quantized?)")
    return dt


# -- statistics graph -------------------------------------------------------------------------
def stats_model(score: onnx.ModelProto, tensors: dict[str, str], reduce: bool,
                elem_type: int = TensorProto.FLOAT, hessian: bool = False, keep: tuple[str, ...] = ()) -> onnx.ModelProto:
    """A copy of the score graph whose outputs are the activations to calibrate (key -> value
    name). reduce=True outputs per-channel max |x| ([C], float32) instead of the whole tensor,
    and with hessian=True also X^T X ([1, C, C], float32, over the window's tokens) for GPTQ and AWQ.
    `keep`: outputs of the score graph that stay outputs (ahead of those). Nodes nothing needs any
    more (the LM head) are dropped."""
    m = copy.deepcopy(score)
    g = m.graph
    outs = [o for o in g.output if o.name in keep]
    if reduce:
        g.initializer.append(numpy_helper.from_array(np.array([0, 1], np.int64), "calib/axes01"))
    for key, value in tensors.items():
        if reduce:
            a, r, c = f"calib/{key}/abs", f"calib/{key}/absmax", f"calib/{key}/absmax_f32"
            g.node.extend([helper.make_node("Abs", [value], [a], name=a),
                           helper.make_node("ReduceMax", [a, "calib/axes01"], [r], name=r, keepdims=0),
                           helper.make_node("Cast", [r], [c], name=c, to=TensorProto.FLOAT)])
            outs.append(helper.make_tensor_value_info(c, TensorProto.FLOAT, None))
            if hessian:
                x, f, t, h = (f"calib/{key}/{n}" for n in ("x_f32", "flat", "flat_t", "xtx"))
                g.node.extend([helper.make_node("Cast", [value], [x], name=x, to=TensorProto.FLOAT),
                               helper.make_node("Flatten", [x], [f], name=f, axis=2),
                               helper.make_node("Transpose", [f], [t], name=t, perm=[1, 0]),
                               helper.make_node("MatMul", [t, f], [h], name=h)])
                outs.append(helper.make_tensor_value_info(h, TensorProto.FLOAT, None))
        else:
            outs.append(helper.make_tensor_value_info(value, elem_type, None))
    del g.output[:]
    g.output.extend(outs)
    prune(m)
    return m


def prune(model: onnx.ModelProto, stop: frozenset[str] = frozenset()) -> None:
    """Drop the nodes and initializers no output needs; values in `stop` (graph inputs) need no producer."""
    g = model.graph
    needed = {o.name for o in g.output}
    kept = []
    for node in reversed(g.node):
        if any(o in needed and o not in stop for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del g.node[:]
    g.node.extend(reversed(kept))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


# -- Q/DQ rewrite -----------------------------------------------------------------------------
@dataclass
class QuantPlan:
    """What to change, by weight/group name (identical for every graph). INT4 weights (w4a16) are
    held packed (uint8, two values per byte) in `tensors`; `int4_shapes` gives their logical shape."""
    weight_scales: dict[str, str] = field(default_factory=dict)   # param -> its scale tensor name
    act_scales: dict[str, float] = field(default_factory=dict)    # group -> per-tensor activation scale
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # new or replaced initializers
    float_dtype: int = TensorProto.FLOAT
    bits: int = 8
    block_size: int | None = None                                 # INT4: input channels per scale
    int4_shapes: dict[str, tuple] = field(default_factory=dict)   # packed INT4 tensor -> logical shape
    head_bits: int | None = None                                  # w4a16 --quantize-head: the head's bits (head.py)
    aliases: dict[str, str] = field(default_factory=dict)         # tensor -> the tensor whose bytes it shares

    def bits_of(self, lin: Linear) -> int:
        return self.head_bits if lin.layer is None and self.head_bits else self.bits

    @staticmethod
    def qweight_name(param: str, bits: int = 8) -> str:
        return f"{param}.int{bits}"

    @staticmethod
    def scale_name(param: str) -> str:
        return f"{param}.scale"


def quantize_graph(model: onnx.ModelProto, kind: str, linears: dict[str, Linear], plan: QuantPlan,
                   make_initializer) -> onnx.ModelProto:
    """A copy of `model` with the plan applied. `make_initializer(name, array)` returns the
    TensorProto to use for a new or replaced tensor (external data: in the output bundle's weights
    file, or in memory; INT4 tensors are external data of their packed bytes)."""
    if plan.int4_shapes and _opset(model) < 21:
        raise UserError(f"{kind}: INT4 blocked DequantizeLinear needs opset 21 or later; the graph has opset "
                        f"{_opset(model)} (re-export with --opset 21)")
    m = copy.deepcopy(model)
    act_np = NP_OF_ONNX.get(plan.float_dtype)
    if plan.act_scales and act_np is None:
        raise UserError(f"activation quantization needs float32 or float16 activations "
                        f"(not {TensorProto.DataType.Name(plan.float_dtype)})")
    quantized = {p for p in plan.weight_scales if p in linears}
    dq_nodes = _swap_weights(m.graph, linears, plan, quantized, _int4_aware(plan, make_initializer))
    _insert_activation_qdq(m.graph, kind, linears, plan, quantized, act_np, dq_nodes)
    return m


def _swap_weights(g: onnx.GraphProto, linears: dict[str, Linear], plan: QuantPlan, quantized: set[str],
                  make_initializer) -> list[onnx.NodeProto]:
    """Drop the float weights we quantize, replace changed initializers, add the INT8 weights and
    scales; returns one DequantizeLinear per quantized weight the graph uses."""
    used = {i for n in g.node for i in n.input}
    new_inits = []
    for t in g.initializer:
        if t.name in quantized:
            continue
        new_inits.append(make_initializer(t.name, plan.tensors[t.name]) if t.name in plan.tensors else t)
    present = {t.name for t in new_inits}
    dq_nodes = []
    for p in sorted(quantized):
        if p not in used:
            continue
        q, s = plan.qweight_name(p, plan.bits_of(linears[p])), plan.weight_scales[p]
        for name in (q, s):
            if name not in present:
                new_inits.append(make_initializer(name, plan.tensors[name]))
                present.add(name)
        # the dequantized weight keeps the float weight's name, so its consumers are unchanged
        if plan.block_size:     # blocks run along the input channels: the axis that is not the output's
            attrs = {"axis": 1 - linears[p].out_axis, "block_size": plan.block_size}
        else:
            attrs = {"axis": linears[p].out_axis}
        dq_nodes.append(helper.make_node("DequantizeLinear", [q, s], [p], name=f"{p}/DequantizeLinear", **attrs))
    del g.initializer[:]
    g.initializer.extend(new_inits)
    return dq_nodes


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _int4_aware(plan: QuantPlan, make_initializer):
    """make_initializer, except that the packed INT4 tensors of the plan become INT4 initializers of
    their logical shape (external data: the packed bytes as they are)."""
    def make(name: str, array: np.ndarray) -> TensorProto:
        shape = plan.int4_shapes.get(name)
        t = make_initializer(name, array)
        if shape is not None:
            t.data_type = TensorProto.INT4
            del t.dims[:]
            t.dims.extend(shape)
        return t
    return make


def _insert_activation_qdq(g: onnx.GraphProto, kind: str, linears: dict[str, Linear], plan: QuantPlan,
                           quantized: set[str], act_np, first_nodes: list[onnx.NodeProto]) -> None:
    """Q/DQ in front of each quantized linear of a group with an activation scale: one
    QuantizeLinear per activation tensor, one DequantizeLinear per consumer. The graph's nodes
    become `first_nodes`, then its own nodes with those pairs in front."""
    act_for_node: dict[str, str] = {}       # node name -> group
    for p in quantized:
        lin = linears[p]
        if lin.group in plan.act_scales:
            for use in lin.uses.get(kind, []):
                act_for_node[use.node] = lin.group
    present = {t.name for t in g.initializer}
    nodes, quantized_values = list(first_nodes), {}
    for node in g.node:
        group = act_for_node.get(node.name)
        if group is not None:
            x = node.input[0]
            sname, zname = f"{group}.input_scale", f"{group}.input_zero_point"
            if sname not in present:
                g.initializer.extend([numpy_helper.from_array(np.array(plan.act_scales[group], act_np), sname),
                                      numpy_helper.from_array(np.array(0, np.int8), zname)])
                present.update((sname, zname))
            if x not in quantized_values:
                xq = f"{x}/int8"
                nodes.append(helper.make_node("QuantizeLinear", [x, sname, zname], [xq], name=f"{x}/QuantizeLinear"))
                quantized_values[x] = xq
            xd = f"{node.name}/input_dq"
            nodes.append(helper.make_node("DequantizeLinear", [quantized_values[x], sname, zname], [xd],
                                          name=f"{node.name}/input/DequantizeLinear"))
            node = copy.deepcopy(node)
            node.input[0] = xd
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
