"""Guided sampling of image codes as a small ONNX graph that ONNX Runtime runs where the logits are
(the GPU with --device cuda), so that per step only the [images] codes cross to the host.

It computes what the host path computes (runtime/guidance.py, then runtime/sampling.py's Sampler),
operation for operation in the same precision:

    restrict to [lo, hi)           Slice
    guidance                       uncond + (cond - uncond) * scale in float32; the conditional rows
                                   themselves when this step's scale is 1 (cfg_interval)
    temperature                    Div (float32)
    top-k                          TopK's k-th value; entries below it -> -inf (ties with it kept)
    greedy                         ArgMax (the first maximum, as numpy's argmax)
    draw                           softmax in float64, the CDF in token order, one uniform per image
                                   drawn on the host from that image's numpy generator (the same
                                   stream the host sampler uses), token = #{j: cdf[j] <= u * cdf[-1]}

The CDF is a two-level prefix sum (inside blocks of 128, then over the block totals): ONNX Runtime's
CUDA CumSum sums every prefix from the start (quadratic in the row length). Summing in another
order changes the float64 CDF by about 1e-16 of its total, far below anything a draw resolves.
Top-p, min-p and the repetition penalty are not expressed: those settings stay on the host sampler.
"""
from __future__ import annotations

import time

import numpy as np

from .sampling import SamplingConfig

BLOCK = 128
OPSET = 21


def device_supports(cfg: SamplingConfig) -> str | None:
    """Why these settings need the host sampler (None when the graph expresses them)."""
    if not cfg.is_greedy and cfg.top_p < 1.0:
        return "top-p"
    if not cfg.is_greedy and cfg.min_p > 0.0:
        return "min-p"
    if cfg.repetition_penalty != 1.0:
        return "a repetition penalty"
    return None


class _Graph:
    """Nodes and constants of the sampler graph (onnx.helper; no torch)."""

    def __init__(self):
        from onnx import helper
        self.helper, self.nodes, self.inits = helper, [], []

    def op(self, kind: str, inputs: list[str], out: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    def const(self, name: str, values, dtype) -> str:
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name


def build_sampler_graph(cfg: SamplingConfig, lo: int, hi: int, vocab: int, guided: bool) -> bytes:
    """The serialized ONNX model: logits float32 [rows, vocab] (cond rows, then uncond rows when
    guided), scale float32 [] (guided), uniform float64 [images] (sampling) -> ids int64 [images]."""
    from onnx import TensorProto, helper
    g = _Graph()
    x = "logits"
    if (lo, hi) != (0, vocab):
        x = g.op("Slice", [x, g.const("lo", [lo], np.int64), g.const("hi", [hi], np.int64),
                           g.const("axis1", [1], np.int64)], "visual")
    inputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", vocab])]
    if guided:
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
        g.nodes.append(helper.make_node("Split", [x], ["cond", "uncond"], name="halves", axis=0, num_outputs=2))
        mixed = g.op("Add", ["uncond", g.op("Mul", [g.op("Sub", ["cond", "uncond"], "diff"), "scale"], "scaled")],
                     "mixed")
        off = g.op("Equal", ["scale", g.const("one", 1.0, np.float32)], "unguided")
        x = g.op("Where", [off, "cond", mixed], "guided")
    width = hi - lo
    if cfg.is_greedy:
        out = g.op("ArgMax", [x], "best", axis=1, keepdims=0)
    else:
        inputs.append(helper.make_tensor_value_info("uniform", TensorProto.DOUBLE, ["images"]))
        out = _draw(g, _filters(g, cfg, x, width), width)
    ids = g.op("Add", [out, g.const("offset", lo, np.int64)], "ids")
    graph = helper.make_graph(g.nodes, "image_sampler", inputs,
                              [helper.make_tensor_value_info(ids, TensorProto.INT64, ["images"])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ardeploy")
    model.ir_version = 10
    return model.SerializeToString()


def _filters(g: _Graph, cfg: SamplingConfig, x: str, width: int) -> str:
    """Temperature, then top-k (runtime/sampling.py's order and definitions)."""
    if cfg.temperature != 1.0:
        x = g.op("Div", [x, g.const("temperature", cfg.temperature, np.float32)], "tempered")
    if cfg.top_k:
        kept = min(cfg.top_k, width)
        values = g.op("TopK", [x, g.const("k", [kept], np.int64)], "topk", axis=1)
        g.nodes[-1].output.append("topk_idx")
        kth = g.op("Slice", [values, g.const("kth_lo", [kept - 1], np.int64), g.const("kth_hi", [kept], np.int64),
                             g.const("axis1_k", [1], np.int64)], "kth")
        x = g.op("Where", [g.op("Less", [x, kth], "below"), g.const("neg_inf", -np.inf, np.float32), x], "top_k")
    return x


def _draw(g: _Graph, x: str, width: int) -> str:
    """Inverse CDF in float64 with the two-level prefix sum (module docstring)."""
    probs = g.op("Softmax", [g.op("Cast", [x], "as_f64", to=11)], "probs", axis=1)
    blocks = -(-width // BLOCK)
    if blocks * BLOCK != width:
        probs = g.op("Pad", [probs, g.const("pads", [0, 0, 0, blocks * BLOCK - width], np.int64)], "padded")
    tiled = g.op("Reshape", [probs, g.const("tiles", [0, blocks, BLOCK], np.int64)], "tiled")
    inner = g.op("CumSum", [tiled, g.const("axis2", 2, np.int64)], "inner")
    totals = g.op("Slice", [inner, g.const("last_lo", [BLOCK - 1], np.int64), g.const("last_hi", [BLOCK], np.int64),
                            g.const("axis2s", [2], np.int64)], "block_totals")
    before = g.op("CumSum", [totals, g.const("axis1s", 1, np.int64)], "before", exclusive=1)
    cdf = g.op("Reshape", [g.op("Add", [inner, before], "cdf_tiled"), g.const("flat", [0, -1], np.int64)], "cdf")
    total = g.op("Slice", [cdf, g.const("end_lo", [-1], np.int64), g.const("end_hi", [blocks * BLOCK], np.int64),
                           g.const("axis1e", [1], np.int64)], "total")
    target = g.op("Mul", [g.op("Unsqueeze", ["uniform", g.const("axis1u", [1], np.int64)], "u"), total], "target")
    under = g.op("Cast", [g.op("LessOrEqual", [cdf, target], "under_b")], "under", to=1)
    count = g.op("Cast", [g.op("ReduceSum", [under, g.const("axis1r", [1], np.int64)], "count_f", keepdims=0)],
                 "count", to=7)
    return g.op("Min", [count, g.const("last_id", width - 1, np.int64)], "drawn")


class DeviceSampler:
    """One session of the sampler graph for one batch's settings; `__call__` per image token. On CUDA
    its run is captured once per logits buffer as a CUDA graph (one launch instead of ~30): logits
    that are already on the device are read where they are (the CUDA-graph decode step keeps them at
    one address per batch size), host logits are staged into a buffer of this sampler's."""

    def __init__(self, cfg: SamplingConfig, lo: int, hi: int, vocab: int, guided: bool, rngs: list,
                 device: str = "cpu", threads: int | None = None, capture: bool | None = None):
        """capture: fixed buffers and CUDA graphs (default: on CUDA; on the CPU the same bindings run
        without a graph, which is how the tests exercise them)."""
        self.cfg, self.guided, self.rngs, self.device, self.vocab = cfg, guided, rngs, device, vocab
        self.model = build_sampler_graph(cfg, lo, hi, vocab, guided)
        self.threads = threads
        self.captured = device == "cuda" if capture is None else capture
        self.session = self._open()
        self._buffers: dict = {}        # rows -> fixed device buffers (captured runs)
        self._graphs: dict = {}         # (rows, logits address) -> (IOBinding, RunOptions)
        self.seconds = 0.0              # spent in __call__ (benchmarks)

    def _open(self):
        from .sessions import open_session, session_options
        return open_session(self.model, session_options(self.threads or 1, warnings=False), self.device,
                            name="image sampler graph", cuda_graph=self.captured)

    def __call__(self, logits, scale: float) -> np.ndarray:
        """logits: [rows, vocab] float32, a numpy array or an OrtValue (on the session's device);
        returns the sampled ids [images] (int64, on the host)."""
        started = time.perf_counter()
        try:
            return self._sample(logits, scale)
        finally:
            self.seconds += time.perf_counter() - started

    def _sample(self, logits, scale: float) -> np.ndarray:
        uniform = np.array([rng.random() for rng in self.rngs], dtype=np.float64) if not self.cfg.is_greedy else None
        if self.captured:
            try:
                return self._replay(logits, scale, uniform)
            except Exception:           # ONNX Runtime refused to capture: run the graph plainly from now on
                self.captured = False
                self.session = self._open()
        io = self.session.io_binding()
        if isinstance(logits, np.ndarray):
            io.bind_cpu_input("logits", np.ascontiguousarray(logits, dtype=np.float32))
        else:
            io.bind_ortvalue_input("logits", logits)
        if self.guided:
            io.bind_cpu_input("scale", np.array(scale, dtype=np.float32))
        if uniform is not None:
            io.bind_cpu_input("uniform", uniform)
        io.bind_output("ids", "cpu")
        self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]

    def _replay(self, logits, scale: float, uniform) -> np.ndarray:
        import onnxruntime as ort
        from .sessions import graph_run_options
        rows = logits.shape[0] if isinstance(logits, np.ndarray) else logits.shape()[0]
        buffers = self._buffers.get(rows)
        if buffers is None:
            def zeros(shape, dtype):
                return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, 0)
            images = rows // 2 if self.guided else rows
            buffers = self._buffers[rows] = {"staging": zeros((rows, self.vocab), np.float32),
                                             "scale": zeros((), np.float32), "uniform": zeros(images, np.float64),
                                             "ids": zeros(images, np.int64)}
        if isinstance(logits, np.ndarray):
            buffers["staging"].update_inplace(np.ascontiguousarray(logits, dtype=np.float32))
            logits = buffers["staging"]
        if self.guided:
            buffers["scale"].update_inplace(np.array(scale, dtype=np.float32))
        if uniform is not None:
            buffers["uniform"].update_inplace(uniform)
        key = (rows, logits.data_ptr())
        if key not in self._graphs:
            io = self.session.io_binding()
            io.bind_ortvalue_input("logits", logits)
            for name in ("scale",) * self.guided + ("uniform",) * (uniform is not None):
                io.bind_ortvalue_input(name, buffers[name])
            io.bind_ortvalue_output("ids", buffers["ids"])
            self._graphs[key] = (io, graph_run_options(len(self._graphs) + 1))
        io, options = self._graphs[key]
        self.session.run_with_iobinding(io, options)
        return buffers["ids"].numpy()
