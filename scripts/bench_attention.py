"""Decode attention over a time-major KV cache, three ways, in ONNX Runtime (one layer at SmolLM2's
geometry: 3 KV heads x 3 query heads each, head size 64; batch 1, one new token; times x 30 layers).

    python scripts/bench_attention.py

A  as exported: Concat past + new, Transpose to head-major, batched MatMul;
B  reading the cache in place: cache viewed [T*n_kv, hd] (scores) and [T, n_kv*hd] (values), one GEMM
   each against all query heads, then the matching head pairs picked by a mask and ReduceSum;
B2 as B, without joining past and new V (the probabilities split instead).
All three are checked to give the same output first. docs/BENCHMARKS.md quotes the result."""
import time

import numpy as np
import onnxruntime as ort
from onnx import helper as h, TensorProto as TP, numpy_helper as nh
H, R, D = 3, 3, 64
F = TP.FLOAT


def main() -> None:
    def sess(g):
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)]); m.ir_version = 10
        so = ort.SessionOptions(); so.intra_op_num_threads = 2
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ins = [h.make_tensor_value_info(n, F, s) for n, s in (("pk", ["T", 1, H, D]), ("pv", ["T", 1, H, D]), ("nk", [1, 1, H, D]), ("nv", [1, 1, H, D]), ("q", [1, H, R, 1, D]))]
    out = [h.make_tensor_value_info("o", F, None)]
    c = lambda name, arr: nh.from_array(np.asarray(arr), name)
    A = h.make_graph([
        h.make_node("Concat", ["pk", "nk"], ["k"], axis=0), h.make_node("Concat", ["pv", "nv"], ["v"], axis=0),
        h.make_node("Transpose", ["k"], ["kt0"], perm=[1, 2, 3, 0]), h.make_node("Unsqueeze", ["kt0", "ax2"], ["kt"]),
        h.make_node("Transpose", ["v"], ["vt0"], perm=[1, 2, 0, 3]), h.make_node("Unsqueeze", ["vt0", "ax2"], ["vt"]),
        h.make_node("MatMul", ["q", "kt"], ["s"]), h.make_node("Softmax", ["s"], ["p"], axis=-1),
        h.make_node("MatMul", ["p", "vt"], ["o"])], "A", ins, out, [c("ax2", np.array([2], np.int64))])
    eye = np.eye(H, dtype=np.float32)
    B = h.make_graph([
        # queries as columns: [H*R, D] -> [D, H*R]
        h.make_node("Reshape", ["q", "sq"], ["q2"]), h.make_node("Transpose", ["q2"], ["qT"], perm=[1, 0]),
        # past scores, cache read in place: [T*H, D] @ [D, H*R] -> [T, H(k), H(q), R] -> pick h(k) == h(q)
        h.make_node("Reshape", ["pk", "s2"], ["pk2"]), h.make_node("MatMul", ["pk2", "qT"], ["sp0"]),
        h.make_node("Reshape", ["sp0", "s4"], ["sp1"]), h.make_node("Mul", ["sp1", "eyeK"], ["sp2"]),
        h.make_node("ReduceSum", ["sp2", "ax1"], ["sp"], keepdims=0),                       # [T, H, R]
        h.make_node("Reshape", ["nk", "s2"], ["nk2"]), h.make_node("MatMul", ["nk2", "qT"], ["sn0"]),
        h.make_node("Reshape", ["sn0", "s4"], ["sn1"]), h.make_node("Mul", ["sn1", "eyeK"], ["sn2"]),
        h.make_node("ReduceSum", ["sn2", "ax1"], ["sn"], keepdims=0),
        h.make_node("Concat", ["sp", "sn"], ["s"], axis=0), h.make_node("Softmax", ["s"], ["p"], axis=0),
        h.make_node("Reshape", ["p", "sTR"], ["p2"]), h.make_node("Transpose", ["p2"], ["pT"], perm=[1, 0]),   # [H*R, T+1]
        h.make_node("Reshape", ["pv", "sV"], ["pv2"]), h.make_node("Reshape", ["nv", "sV"], ["nv2"]),
        h.make_node("Concat", ["pv2", "nv2"], ["vv"], axis=0),   # NOTE: joins V (what we'd avoid with split pT)
        h.make_node("MatMul", ["pT", "vv"], ["o0"]),                                          # [H*R, H*D]
        h.make_node("Reshape", ["o0", "sO"], ["o1"]), h.make_node("Mul", ["o1", "eyeV"], ["o2"]),
        h.make_node("ReduceSum", ["o2", "ax2"], ["o"], keepdims=0)], "B", ins, out,
        [c("sq", np.array([H * R, D], np.int64)), c("s2", np.array([-1, D], np.int64)), c("s4", np.array([-1, H, H, R], np.int64)),
         c("eyeK", eye.reshape(1, H, H, 1)), c("ax1", np.array([1], np.int64)), c("sTR", np.array([-1, H * R], np.int64)),
         c("sV", np.array([-1, H * D], np.int64)), c("sO", np.array([H, R, H, D], np.int64)), c("eyeV", eye.reshape(H, 1, H, 1)),
         c("ax2", np.array([2], np.int64))])
    # B2: the same, values without the join: pT split into past / new parts
    B2nodes = [n for n in B.node if n.output[0] not in ("vv", "o0")]
    i = [k for k, n in enumerate(B2nodes) if n.output[0] == "nv2"][0] + 1
    B2nodes[i:i] = [h.make_node("Slice", ["pT", "zero", "minus1", "one"], ["pTp"]), h.make_node("Slice", ["pT", "minus1", "big", "one"], ["pTn"]),
                    h.make_node("MatMul", ["pTp", "pv2"], ["op"]), h.make_node("MatMul", ["pTn", "nv2"], ["on"]), h.make_node("Add", ["op", "on"], ["o0"])]
    B2 = h.make_graph(B2nodes, "B2", ins, out, list(B.initializer) + [c("zero", np.array([0], np.int64)), c("minus1", np.array([-1], np.int64)),
                      c("one", np.array([1], np.int64)), c("big", np.array([1 << 30], np.int64))])
    sa, sb, sb2 = sess(A), sess(B), sess(B2)
    rng = np.random.default_rng(0)
    for T in (16, 512, 1536):
        feeds = {"pk": rng.standard_normal((T, 1, H, D), np.float32), "pv": rng.standard_normal((T, 1, H, D), np.float32),
                 "nk": rng.standard_normal((1, 1, H, D), np.float32), "nv": rng.standard_normal((1, 1, H, D), np.float32),
                 "q": rng.standard_normal((1, H, R, 1, D), np.float32)}
        oa = sa.run(None, feeds)[0].reshape(H, R, D); ob = sb.run(None, feeds)[0].reshape(H, R, D); ob2 = sb2.run(None, feeds)[0].reshape(H, R, D)
        assert np.allclose(oa, ob, atol=1e-5) and np.allclose(oa, ob2, atol=1e-5)
        res = []
        for s in (sa, sb, sb2):
            for _ in range(20): s.run(None, feeds)
            started = time.perf_counter()
            for _ in range(600): s.run(None, feeds)
            res.append((time.perf_counter() - started) / 600 * 30 * 1000)       # ms per 30-layer step
        print(f"T={T:5d}: as exported {res[0]:6.2f} ms/step, in place {res[1]:6.2f}, in place without V join {res[2]:6.2f} (30 layers)")


if __name__ == "__main__":
    main()
