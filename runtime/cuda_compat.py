"""Graph rewrites for what ONNX Runtime's CUDA provider has no kernel for, applied when a session is
opened on the GPU; the bundle's files stay as they are.

Blocked INT8 DequantizeLinear (opset 21 `block_size`): a w4a16 bundle's 8-bit head in the portable graphs
(`--quantize-head`; calibration/head.py). ONNX Runtime 1.31's CUDA DequantizeLinear refuses it at run time
("Unsupported quantization type", seen on an H200 running `eval --device cuda`), after it fused the other
reader of the same table into MatMulNBits. The rewrite computes the same values with operators every
provider has: Cast(int8 -> float) [rows, cols], Reshape to [rows, cols / block, block], Mul by the scales
[rows, cols / block, 1], Reshape back — the product DequantizeLinear defines, exactly (zero point 0).
"""
from __future__ import annotations

import numpy as np


def blocked_int8_dequantizes(model) -> list:
    """The DequantizeLinear nodes of `model` over a 2-D INT8 initializer with block_size along axis 1 and no
    zero point: the ones rewritten."""
    from onnx import TensorProto
    inits = {t.name: t for t in model.graph.initializer}
    found = []
    for n in model.graph.node:
        attrs = {a.name: a.i for a in n.attribute}
        w = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if w is not None and w.data_type == TensorProto.INT8 and len(w.dims) == 2 and attrs.get("block_size") \
                and attrs.get("axis", 1) in (1, -1) and len(n.input) == 2 and n.input[1] in inits:
            found.append(n)
    return found


def dequantize_blocks_by_hand(model) -> int:
    """Rewrite every blocked INT8 DequantizeLinear of `model` in place (module docstring); returns how many."""
    from onnx import helper, numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    nodes = blocked_int8_dequantizes(model)
    for n in nodes:
        rows, cols = inits[n.input[0]].dims
        block = {a.name: a.i for a in n.attribute}["block_size"]
        scale_type = inits[n.input[1]].data_type
        p = n.output[0] + "/by_hand"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array([rows, cols // block, block], np.int64), p + "/blocks_shape"),
            numpy_helper.from_array(np.array([rows, cols], np.int64), p + "/shape"),
            numpy_helper.from_array(np.array([2], np.int64), p + "/axis2")])
        replacement = [
            helper.make_node("Cast", [n.input[0]], [p + "/float"], name=p + "/cast", to=scale_type),
            helper.make_node("Reshape", [p + "/float", p + "/blocks_shape"], [p + "/blocks"], name=p + "/split"),
            helper.make_node("Unsqueeze", [n.input[1], p + "/axis2"], [p + "/scales"], name=p + "/scales"),
            helper.make_node("Mul", [p + "/blocks", p + "/scales"], [p + "/scaled"], name=p + "/mul"),
            helper.make_node("Reshape", [p + "/scaled", p + "/shape"], [n.output[0]], name=p + "/join")]
        at = list(model.graph.node).index(n)
        model.graph.node.remove(n)
        for i, new in enumerate(replacement):
            model.graph.node.insert(at + i, new)
    return len(nodes)

