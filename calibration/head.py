"""The quantized LM head of w4a16 bundles (`--quantize-head`), and how the ONNX Runtime graph reads it.

The head is quantized in blocks of --block-size input channels, like the decoder's linears, but
with HEAD_BITS bits: 8 by default (llama.cpp's 4-bit files keep the tied embedding/output at 8-bit
blocks too; a 4-bit head costs perplexity, ORT #24384), round to nearest with absmax / 127 scales.
A tied table is also the embedding, so no data-driven rounding (GPTQ moves error onto other input
channels, which the embedding lookup sees unaveraged): 4-bit tied heads take scales searched on
the weights alone.

Layouts of the one quantized table [vocab, d] (blocks along d), scales [vocab, d / block] shared:
  portable graphs   signed int8 (or INT4) -> DequantizeLinear(axis 1, block_size) -> Gather / Gemm:
                    what TensorRT takes (zero point 0)
  ONNX Runtime      unsigned (value + 2^(bits-1)), read by BOTH MatMulNBits (the head, B as
                    [vocab, d / block, block * bits / 8]) and GatherBlockQuantized (the embedding, data
                    [vocab, d * bits / 8]): two initializers pointing at the same bytes of weights.bin.
                    Their default zero points are both 2^(bits-1), so they read identical values.
Signed and unsigned nibbles differ (XOR 0x8), and TensorRT refuses non-zero zero points, so the
bundle holds the table twice (once per layout); the runtime maps only the ONNX Runtime copy.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .int4 import Int4Weight, pack_nibbles, quantize_rtn, search_clip

HEAD_BITS = 8
INT8_HEAD_BLOCK = 32    # w8a16's per-channel head read by ONNX Runtime's blocked ops: any block gives the same values
MS_DOMAIN = "com.microsoft"
ACCURACY_LEVEL = 4      # int8 activations: what ONNX Runtime gives the decoder's fused MatMulNBits (and fast for 8 bits)


def quantize_head(w_oi: np.ndarray, block: int, bits: int, ops=None) -> Int4Weight:
    """[vocab, d] -> per-block symmetric values (int8 holder) and scales [vocab, n_blocks]; `ops`: where
    the arithmetic runs (compute.py; default numpy)."""
    rtn, clip = (quantize_rtn, search_clip) if ops is None else (ops.quantize_rtn, ops.search_clip)
    w = np.asarray(w_oi, np.float32)
    if bits == 4:
        return rtn(w, block, clip(w, block, None))
    return rtn(w, block, qmax=2 ** (bits - 1) - 1)


def pack_unsigned(w: Int4Weight, bits: int) -> np.ndarray:
    """uint8 [vocab, d * bits / 8]: value + 2^(bits-1), two 4-bit values per byte (low nibble first)."""
    u = w.q.astype(np.int16) + 2 ** (bits - 1)
    if bits == 8:
        return u.astype(np.uint8)
    return pack_nibbles(u).reshape(w.q.shape[0], -1)


def unsigned_names(param: str, bits: int) -> tuple[str, str]:
    """(the table GatherBlockQuantized reads, its blocked view MatMulNBits reads)."""
    return f"{param}.uint{bits}", f"{param}.uint{bits}.blocks"


def int8_head_for_ort(param: str, q: np.ndarray, scale: np.ndarray, tensors: dict[str, np.ndarray]) -> dict[str, str]:
    """A per-output-channel INT8 head table (w8a16 `--quantize-head`; q [vocab, d], scale [vocab]) in the
    layout the ONNX Runtime graph reads: the unsigned table, its blocked view and each row's scale repeated
    over its blocks of INT8_HEAD_BLOCK (the same values: a block's scale is its row's). Without it ONNX
    Runtime dequantizes the whole table twice every step (for the embedding and for the head): SmolLM2
    w8a16 with the head decoded at 54 tok/s against 63-77 in FP32. Returns the alias (blocks -> table);
    nothing when d does not divide into blocks."""
    vocab, d = q.shape
    if d % INT8_HEAD_BLOCK:
        return {}
    table, blocks = unsigned_names(param, 8)
    tensors[table] = (q.astype(np.int16) + 128).astype(np.uint8)
    tensors[blocks] = tensors[table].reshape(vocab, d // INT8_HEAD_BLOCK, INT8_HEAD_BLOCK)
    tensors[blocked_scale_name(param)] = np.repeat(np.asarray(scale).reshape(vocab, 1), d // INT8_HEAD_BLOCK, axis=1)
    return {blocks: table}


def blocked_scale_name(param: str) -> str:
    return f"{param}.uint8.block_scale"


def rewrite_ort_head(model: onnx.ModelProto, param: str, bits: int, block: int, make_initializer,
                     arrays: dict[str, np.ndarray]) -> None:
    """In a quantized ONNX Runtime graph whose head table `param` ([vocab, d], tied to the embedding or
    not) is DequantizeLinear'd whole: drop that dequantize, gather rows with GatherBlockQuantized and
    compute the head with MatMulNBits, both on the one unsigned table (`arrays` holds it, see
    unsigned_names)."""
    g = model.graph
    (dq,) = [n for n in g.node if n.op_type == "DequantizeLinear" and list(n.output) == [param]]
    scale = dq.input[1]
    if blocked_scale_name(param) in arrays:            # a per-channel INT8 head: its scales repeated per block
        scale = blocked_scale_name(param)
    table, blocks = unsigned_names(param, bits)
    vocab, width = arrays[table].shape
    d = width * 8 // bits
    transposed = {n.output[0] for n in g.node if n.op_type == "Transpose" and list(n.input) == [param]}
    nodes, used = [], set()
    for n in g.node:
        if n is dq or (n.op_type == "Transpose" and n.output[0] in transposed):
            continue
        if n.op_type == "Gather" and n.input[0] == param:
            n = helper.make_node("GatherBlockQuantized", [table, n.input[1], scale], list(n.output), name=n.name,
                                 domain=MS_DOMAIN, bits=bits, block_size=block, quantize_axis=1, gather_axis=0)
        elif (n.op_type == "Gemm" and len(n.input) == 2 and n.input[1] == param and _trans_b(n)) or \
                (n.op_type == "MatMul" and n.input[1] in transposed):     # untied: x @ W^T
            n = helper.make_node("MatMulNBits", [n.input[0], blocks, scale], list(n.output), name=n.name,
                                 domain=MS_DOMAIN, K=d, N=vocab, bits=bits, block_size=block,
                                 accuracy_level=ACCURACY_LEVEL)
        elif param in n.input or transposed & set(n.input):
            raise ValueError(f"{n.name}: reads the table {param} in a way the quantized head does not handle")
        used.update(n.input)
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    kept = [t for t in g.initializer if t.name not in (dq.input[0], dq.input[1]) or t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + [make_initializer(t, arrays[t]) for t in (table, blocks, scale)
                                 if t in used and t not in {k.name for k in kept}])


def _trans_b(node: onnx.NodeProto) -> bool:
    return any(a.name == "transB" and a.i == 1 for a in node.attribute) and \
        not any(a.name == "transA" and a.i for a in node.attribute)
