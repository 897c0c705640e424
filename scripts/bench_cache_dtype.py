"""Would an FP16 KV cache make CPU decode faster? One GroupQueryAttention node at SmolLM2's geometry
(9 query heads, 3 KV heads, head size 64, a 2048-position cache updated in place as the runtime binds it),
batch 1, one new token, timed in ONNX Runtime's CPU provider with an FP32 and an FP16 cache, alternating.

    python scripts/bench_cache_dtype.py [--contexts 16,512,1024] [--threads 2] [--steps 300]

Prints microseconds per layer-step and the sum over SmolLM2's 30 layers. docs/CALIBRATION.md quotes it: on
x86 the FP16 kernel is slower (no native FP16 arithmetic in ONNX Runtime's CPU attention there), so CPU
bundles keep an FP32 cache.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

HEADS, KV_HEADS, HEAD_SIZE, MAX_SEQ, LAYERS = 9, 3, 64, 2048, 30
DTYPES = {"fp32": (TensorProto.FLOAT, np.float32), "fp16": (TensorProto.FLOAT16, np.float16)}


def attention_model(elem: int) -> bytes:
    def value(name, shape):
        return helper.make_tensor_value_info(name, elem, shape)
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total_len"],
                            ["out", "present_k", "present_v"], domain="com.microsoft",
                            num_heads=HEADS, kv_num_heads=KV_HEADS)
    cache = [1, KV_HEADS, MAX_SEQ, HEAD_SIZE]
    graph = helper.make_graph(
        [node], "gqa",
        [value("q", [1, 1, HEADS * HEAD_SIZE]), value("k", [1, 1, KV_HEADS * HEAD_SIZE]),
         value("v", [1, 1, KV_HEADS * HEAD_SIZE]), value("past_k", cache), value("past_v", cache),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
         helper.make_tensor_value_info("total_len", TensorProto.INT32, [])],
        [value("out", None), value("present_k", None), value("present_v", None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def bound_step(dtype: str, context: int, threads: int, rng):
    """A session and an IO binding whose cache outputs are its cache inputs (in place, as the runtime runs)."""
    elem, np_dtype = DTYPES[dtype]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(attention_model(elem), options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    for name, width in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
        binding.bind_cpu_input(name, rng.standard_normal((1, 1, width * HEAD_SIZE)).astype(np_dtype))
    binding.bind_cpu_input("seqlens_k", np.array([context - 1], np.int32))
    binding.bind_cpu_input("total_len", np.array(context, np.int32))
    for past, present in (("past_k", "present_k"), ("past_v", "present_v")):
        cache = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, KV_HEADS, MAX_SEQ, HEAD_SIZE)).astype(np_dtype))
        binding.bind_ortvalue_input(past, cache)
        binding.bind_ortvalue_output(present, cache)
    binding.bind_output("out")
    return lambda: session.run_with_iobinding(binding)


def microseconds(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="16,512,1024", help="cached positions, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300, help="timed steps per dtype and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two dtypes (median kept)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for context in (int(c) for c in args.contexts.split(",")):
        steps = {dtype: bound_step(dtype, context, args.threads, rng) for dtype in DTYPES}
        for step in steps.values():
            for _ in range(20):
                step()
        times = {dtype: [] for dtype in DTYPES}
        for _ in range(args.rounds):
            for dtype, step in steps.items():
                times[dtype].append(microseconds(step, args.steps))
        med = {dtype: float(np.median(t)) for dtype, t in times.items()}
        print(f"context {context}: FP32 cache {med['fp32']:.0f} us, FP16 cache {med['fp16']:.0f} us per layer-step "
              f"(x{LAYERS} layers: {med['fp32'] * LAYERS / 1e3:.2f} / {med['fp16'] * LAYERS / 1e3:.2f} ms; "
              f"FP16 / FP32 {med['fp16'] / med['fp32']:.2f})")


if __name__ == "__main__":
    main()
