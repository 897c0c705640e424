"""Guided sampling of image codes as ONNX nodes that ONNX Runtime runs where the logits are (the GPU with
--device cuda), so that per step only the [images] codes cross to the host.

The nodes are a *tail* that reads a [rows, vocab] logits tensor. It runs in one of two places:

- appended to the decode step's own graph (`add_sampler`, asked for by the image generator on the GPU):
  the captured CUDA-graph step then computes the logits and draws the codes in one replay;
- as a graph of its own (`build_sampler_graph`, `DeviceSampler`) on logits a step already made: the
  first code of an image (its logits come from the prompt) and any step that was not replayed.

It computes what the host path computes (runtime/guidance.py, then runtime/sampling.py's Sampler),
operation for operation in the same precision:

    the image's rows               Gather the conditional and the unconditional row of each image
    restrict to [lo, hi)           Slice
    guidance                       uncond + (cond - uncond) * scale in float32; the conditional rows
                                   themselves when this step's scale is 1 (cfg_interval, no guidance)
    greedy                         ArgMax (the first maximum, as numpy's argmax)
    temperature                    Div (float32; x / 1 is x)
    top-k                          the smallest of TopK's k values; entries below it -> -inf (ties kept)
    draw                           exp(x - max) in float64 (the softmax before its division, which the
                                   draw does not need), the CDF in token order, one uniform per image
                                   drawn on the host from that image's numpy generator (the same
                                   stream the host sampler uses), token = #{j: cdf[j] <= u * cdf[-1]}

ArgMin and ArgMax, not reductions, find the k-th and the largest value, and TopK leaves its k values
unsorted: on an H200 (2026-12-07) a cuDNN reduction kernel ran once per step for ~96 us (by elimination a
ReduceMin over the [rows, k] values; ArgMax runs as ONNX Runtime's own ~4 us kernel), the float64 Softmax
took ~26 us, and TopK ~88 us at k = 2000, whose CUDA kernel sorts the k values it selected when asked to.

Every setting is an input (`sampler_feeds`), so one graph serves every batch and setting; a step that
draws nothing (a prompt) is given `default_feeds()` and computes a throwaway code for row 0. k is read
on the host by TopK: a captured step records it, so a captured step is recorded per k
(runtime/backends/ort.py). No top-k sorts the whole row (k = width).

The CDF is a two-level prefix sum (inside blocks of 128, then over the block totals): ONNX Runtime's
CUDA CumSum sums every prefix from the start (quadratic in the row length). Summing in another
order, or without the softmax's division, changes the float64 CDF by about 1e-16 of its total, far
below anything a draw resolves.
Top-p, min-p and the repetition penalty are not expressed: those settings stay on the host sampler.
"""
from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .sampling import SamplingConfig

BLOCK = 128
OPSET = 21
PREFIX = "sampler/"                 # names of the tail's nodes and values inside a step graph
OUTPUT = "sampled_ids"              # int64 [images]: the drawn token ids (lo already added)
HOST_INPUTS = ("sample_top_k",)     # read on the host by TopK: fixed in a captured step


def _inputs():
    """(name, ONNX type, dims, default) of the tail's inputs."""
    from onnx import TensorProto as T
    return (("sample_cond_rows", T.INT64, ["images"], np.zeros(1, np.int64)),
            ("sample_uncond_rows", T.INT64, ["images"], np.zeros(1, np.int64)),
            ("sample_scale", T.FLOAT, [], np.array(1.0, np.float32)),
            ("sample_greedy", T.BOOL, [], np.array(True)),
            ("sample_temperature", T.FLOAT, [], np.array(1.0, np.float32)),
            ("sample_top_k", T.INT64, [1], np.ones(1, np.int64)),
            ("sample_uniform", T.DOUBLE, ["images"], np.zeros(1, np.float64)))


@functools.lru_cache(maxsize=1)
def default_feeds() -> dict:
    """Inputs for a step that draws nothing: one image, row 0, greedy (the same arrays every time, read only:
    a captured step's buffers then skip them at a glance)."""
    return {name: default for name, _, _, default in _inputs()}


def device_supports(cfg: SamplingConfig) -> str | None:
    """Why these settings need the host sampler (None when the graph expresses them)."""
    if not cfg.is_greedy and cfg.top_p < 1.0:
        return "top-p"
    if not cfg.is_greedy and cfg.min_p > 0.0:
        return "min-p"
    if cfg.repetition_penalty != 1.0:
        return "a repetition penalty"
    return None


class SamplerFeeds:
    """The tail's inputs, code after code, for one batch of images: rows b and images + b (guided), the
    settings, this code's scale and one uniform per image from its generator (none drawn when greedy, as on
    the host). What does not change is the same array object every time (a captured step's buffers then
    skip it at a glance: backends/cuda_graph.FixedInputs)."""

    def __init__(self, cfg: SamplingConfig, images: int, guided: bool, width: int):
        rows = np.arange(images, dtype=np.int64)
        self.greedy, self.guided = cfg.is_greedy, guided
        k = 1 if self.greedy else min(cfg.top_k or width, width)
        self.settings = {"sample_cond_rows": rows, "sample_uncond_rows": rows + images if guided else rows,
                         "sample_greedy": np.array(self.greedy),
                         "sample_temperature": np.array(1.0 if self.greedy else cfg.temperature, np.float32),
                         "sample_top_k": np.array([k], np.int64)}
        self.no_draw = np.zeros(images)
        self.scale = (None, None)

    def __call__(self, scale: float, rngs: list) -> dict:
        scale = scale if self.guided else 1.0
        if self.scale[0] != scale:
            self.scale = (scale, np.array(scale, np.float32))
        uniform = self.no_draw if self.greedy else np.array([rng.random() for rng in rngs], dtype=np.float64)
        return {**self.settings, "sample_scale": self.scale[1], "sample_uniform": uniform}


def sampler_feeds(cfg: SamplingConfig, images: int, guided: bool, scale: float, rngs: list, width: int) -> dict:
    """The tail's inputs for one code of each image (SamplerFeeds, once)."""
    return SamplerFeeds(cfg, images, guided, width)(scale, rngs)


class _Graph:
    """Nodes and constants of the tail (onnx.helper; no torch), every name under PREFIX."""

    def __init__(self):
        from onnx import helper
        self.helper, self.nodes, self.inits = helper, [], []

    def op(self, kind: str, inputs: list[str], out: str, n_out: int = 1, **attrs) -> str:
        outs = [PREFIX + out] + [f"{PREFIX}{out}/{i}" for i in range(1, n_out)]
        self.nodes.append(self.helper.make_node(kind, inputs, outs, name=PREFIX + out, **attrs))
        return outs[0]

    def const(self, name: str, values, dtype) -> str:
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), PREFIX + name))
        return PREFIX + name


def add_sampler(graph, lo: int, hi: int, vocab: int, logits: str = "logits") -> None:
    """Append the tail to `graph` (an onnx GraphProto whose value `logits` is [rows, vocab] float32): its
    inputs and the output OUTPUT."""
    from onnx import helper
    g = _Graph()
    cond = g.op("Gather", [logits, "sample_cond_rows"], "cond_rows", axis=0)
    uncond = g.op("Gather", [logits, "sample_uncond_rows"], "uncond_rows", axis=0)
    if (lo, hi) != (0, vocab):
        bounds = [g.const("lo", [lo], np.int64), g.const("hi", [hi], np.int64), g.const("axis1", [1], np.int64)]
        cond, uncond = g.op("Slice", [cond, *bounds], "cond"), g.op("Slice", [uncond, *bounds], "uncond")
    mixed = g.op("Add", [uncond, g.op("Mul", [g.op("Sub", [cond, uncond], "diff"), "sample_scale"], "scaled")],
                 "mixed")
    off = g.op("Equal", ["sample_scale", g.const("one", 1.0, np.float32)], "unguided")
    guided = g.op("Where", [off, cond, mixed], "guided")
    best = g.op("ArgMax", [guided], "best", axis=1, keepdims=0)
    tempered = g.op("Div", [guided, "sample_temperature"], "tempered")
    # the k largest in any order (sorting them was most of TopK's time), the smallest of them found by ArgMin
    top = g.op("TopK", [tempered, "sample_top_k"], "top_values", n_out=2, axis=1, sorted=0)
    kth = g.op("GatherElements", [top, g.op("ArgMin", [top], "kth_at", axis=1, keepdims=1)], "kth", axis=1)
    at_best = g.op("Unsqueeze", [best, g.const("axis1b", [1], np.int64)], "best_at")
    peak = g.op("GatherElements", [tempered, at_best], "peak", axis=1)     # the largest: where ArgMax found it
    kept = g.op("Where", [g.op("Less", [tempered, kth], "below"), g.const("neg_inf", -np.inf, np.float32), tempered],
                "top_k")
    drawn = _draw(g, kept, peak, hi - lo)
    picked = g.op("Where", ["sample_greedy", best, drawn], "picked")
    graph.node.extend(g.nodes + [helper.make_node("Add", [picked, g.const("offset", lo, np.int64)], [OUTPUT],
                                                  name=PREFIX + "ids")])
    graph.initializer.extend(g.inits)
    for name, kind, dims, _ in _inputs():
        graph.input.append(helper.make_tensor_value_info(name, kind, dims))
    graph.output.append(helper.make_tensor_value_info(OUTPUT, helper.TensorProto.INT64, ["images"]))


def _draw(g: _Graph, x: str, peak: str, width: int) -> str:
    """Inverse CDF in float64 with the two-level prefix sum (module docstring) over exp(x - the row's
    largest value), unnormalized: the draw compares with u times the last entry, so dividing by the sum
    first (the host's softmax) changes nothing but rounding."""
    shifted = g.op("Sub", [g.op("Cast", [x], "as_f64", to=11), g.op("Cast", [peak], "peak_f64", to=11)], "shifted")
    probs = g.op("Exp", [shifted], "weights")
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
    target = g.op("Mul", [g.op("Unsqueeze", ["sample_uniform", g.const("axis1u", [1], np.int64)], "u"), total],
                  "target")
    under = g.op("Cast", [g.op("LessOrEqual", [cdf, target], "under_b")], "under", to=1)
    count = g.op("Cast", [g.op("ReduceSum", [under, g.const("axis1c", [1], np.int64)], "count_f", keepdims=0)],
                 "count", to=7)
    return g.op("Min", [count, g.const("last_id", width - 1, np.int64)], "drawn")


def build_sampler_graph(lo: int, hi: int, vocab: int) -> bytes:
    """The tail as a serialized model of its own: logits float32 [rows, vocab] and the tail's inputs ->
    OUTPUT int64 [images]."""
    from onnx import TensorProto, helper
    graph = helper.make_graph([], "image_sampler", [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                   ["rows", vocab])], [])
    add_sampler(graph, lo, hi, vocab)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ardeploy")
    model.ir_version = 10
    return model.SerializeToString()


class DeviceSampler:
    """One session of the sampler graph for a visual range; `__call__` per image token. On CUDA its run
    is captured once per logits buffer and k as a CUDA graph (one launch instead of ~30): logits that
    are already on the device are read where they are (the CUDA-graph decode step keeps them at one
    address per batch size), host logits are staged into a buffer of this sampler's."""

    def __init__(self, lo: int, hi: int, vocab: int, device: str = "cpu", threads: int | None = None,
                 capture: bool | None = None):
        """capture: fixed buffers and CUDA graphs (default: on CUDA; on the CPU the same bindings run
        without a graph, which is how the tests exercise them)."""
        self.device, self.vocab, self.width = device, vocab, hi - lo
        self.model = build_sampler_graph(lo, hi, vocab)
        self.threads = threads
        self.captured = device == "cuda" if capture is None else capture
        self.session = self._open()
        self._buffers: dict = {}        # (rows, images) -> fixed device buffers (captured runs)
        self._graphs: dict = {}         # (rows, images, k, logits address) -> (IOBinding, RunOptions)
        self.seconds = 0.0              # spent in __call__ (benchmarks)

    def _open(self):
        from .sessions import open_session, session_options
        return open_session(self.model, session_options(self.threads or 1, warnings=False), self.device,
                            name="image sampler graph", cuda_graph=self.captured)

    def __call__(self, logits, feeds: dict) -> np.ndarray:
        """logits: [rows, vocab] float32, a numpy array or an OrtValue (on the session's device); feeds:
        `sampler_feeds`; returns the sampled ids [images] (int64, on the host)."""
        started = time.perf_counter()
        try:
            if self.captured:
                try:
                    return self._replay(logits, feeds)
                except Exception:       # ONNX Runtime refused to capture: run the graph plainly from now on
                    self.captured = False
                    self.session = self._open()
            return self._run(logits, feeds)
        finally:
            self.seconds += time.perf_counter() - started

    def _run(self, logits, feeds: dict) -> np.ndarray:
        io = self.session.io_binding()
        if isinstance(logits, np.ndarray):
            io.bind_cpu_input("logits", np.ascontiguousarray(logits, dtype=np.float32))
        else:
            io.bind_ortvalue_input("logits", logits)
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output(OUTPUT, "cpu")
        self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]

    def _replay(self, logits, feeds: dict) -> np.ndarray:
        import onnxruntime as ort
        rows = logits.shape[0] if isinstance(logits, np.ndarray) else logits.shape()[0]
        images = len(feeds["sample_cond_rows"])
        buffers = self._buffers.get((rows, images))
        if buffers is None:
            staging = ort.OrtValue.ortvalue_from_numpy(np.zeros((rows, self.vocab), np.float32), self.device, 0)
            buffers = self._buffers[(rows, images)] = (fixed_feeds(feeds, self.device), staging)
        fixed, staging = buffers
        if isinstance(logits, np.ndarray):
            staging.update_inplace(np.ascontiguousarray(logits, dtype=np.float32))
            logits = staging
        fixed.update(feeds)
        key = (rows, images, int(feeds["sample_top_k"][0]), logits.data_ptr())
        if key not in self._graphs:
            from .sessions import graph_run_options
            io = self.session.io_binding()
            io.bind_ortvalue_input("logits", logits)
            fixed.bind(io)
            self._graphs[key] = (io, graph_run_options(len(self._graphs) + 1))
        io, options = self._graphs[key]
        self.session.run_with_iobinding(io, options)
        return fixed.output.numpy()


def fixed_feeds(feeds: dict, device: str):
    """The tail's inputs and output at fixed device addresses, for a captured graph (k stays on the host)."""
    from .backends.cuda_graph import FixedInputs
    return FixedInputs(feeds, device, host=HOST_INPUTS, output=(OUTPUT, feeds["sample_cond_rows"].shape, np.int64))

