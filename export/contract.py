"""The graph I/O contract: names, dtypes and symbolic shapes of every graph's inputs and outputs.

KV tensors are time-major [T, B, n_kv_heads, head_dim]: the first P positions of a preallocated
cache [T_max, B, H, D] are one contiguous block, and so is position P for every sequence of the
batch, so a runtime binds slices of its own cache and never copies a KV byte.
"""
from __future__ import annotations

from onnx import TensorProto, helper

from .spec import ModelSpec

DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
DTYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16",
               TensorProto.BFLOAT16: "bfloat16", TensorProto.INT64: "int64", TensorProto.INT32: "int32"}


def graph_io(spec: ModelSpec, kind: str, dtype: str) -> dict[str, list[tuple[str, int, list]]]:
    """(name, onnx elem type, shape) of each input and output; shape entries are ints or dim names."""
    kv = DTYPES[dtype]
    n_kv, hd = spec.n_kv_heads, spec.head_dim
    mask_len = "total_seq" if kind == "decode" else "seq"
    inputs = [("input_ids", TensorProto.INT64, ["batch", "seq"]),
              ("attention_mask", TensorProto.INT64, ["batch", mask_len])]
    if kind == "decode":
        for i in range(spec.n_layers):
            inputs += [(f"past.{i}.{x}", kv, ["past_seq", "batch", n_kv, hd]) for x in ("key", "value")]
    if kind == "score":
        return {"inputs": inputs, "outputs": [("logits", TensorProto.FLOAT, ["batch", "seq", spec.vocab_size])]}
    outputs = [("logits", TensorProto.FLOAT, ["batch", spec.vocab_size])]
    for i in range(spec.n_layers):
        outputs += [(f"present.{i}.{x}", kv, ["seq", "batch", n_kv, hd]) for x in ("key", "value")]
    return {"inputs": inputs, "outputs": outputs}


def value_infos(io: dict) -> dict:
    return {side: [helper.make_tensor_value_info(n, t, s) for n, t, s in io[side]] for side in ("inputs", "outputs")}


def describe(io: dict) -> dict:
    """JSON-friendly form for manifest.json."""
    return {side: [{"name": n, "dtype": DTYPE_NAMES[t], "shape": s} for n, t, s in io[side]]
            for side in ("inputs", "outputs")}
