"""The one place ONNX Runtime sessions are made: options, providers, and a one-line error naming the
graph when ONNX Runtime cannot load it. The backend, the VQ decoder and calibration all use it."""
from __future__ import annotations

import json
from pathlib import Path

from .bundle import BundleError
from .errors import UserError


def providers(device: str, cuda_graph: bool = False) -> list:
    """Execution providers for `device` ("cpu" or "cuda"); the CPU provider stays as the fallback.
    cuda_graph: let the CUDA provider capture runs as CUDA graphs (every run must then say which
    graph it is with the run option gpu_graph_id; -1 runs without one)."""
    import onnxruntime as ort
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("--device cuda needs ONNX Runtime's CUDA provider: pip install 'ardeploy[gpu]' "
                            "(onnxruntime-gpu, in place of onnxruntime) on a machine with an NVIDIA GPU")
        # No TF32: fp32 graphs then compute what the CPU computes (TF32 matmuls moved LlamaGen's sampled
        # codes on an H200); fp16 graphs are unaffected.
        options = {"use_tf32": "0", **({"enable_cuda_graph": "1"} if cuda_graph else {})}
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    raise UserError(f"unknown device {device!r} (cpu or cuda)")


def graph_run_options(graph_id: int):
    """RunOptions naming the CUDA graph a run records or replays (-1: none). A session made with
    cuda_graph=True must be given one on every run (without it ONNX Runtime would record graph 0)."""
    import onnxruntime as ort
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


# x86 CPUs without VNNI multiply uint8 activations by int8 weights with VPMADDUBSW, which saturates the sum of
# each pair of products at int16: w8a8 graphs then compute something else than on a VNNI CPU (KL to FP32 0.0143
# against 0.0007 on the tiny test model, SmolLM2 perplexity 1.038x against 1.018x, measured on an AVX2-only EPYC).
# This entry makes ONNX Runtime store such weights as uint8 (w + 128, its zero point likewise) so that the
# uint8 x uint8 kernels run, which widen to 16 bits first and saturate nothing: every x86 CPU computes the same
# exact int8 products (a VNNI CPU already did, so there it costs speed, not accuracy). It is set only for graphs
# with int8 activations from fp32 whose int8 weights all feed a MatMul/Gemm: ONNX Runtime 1.32 converts a weight
# that also feeds something else (a tied embedding's Gather) or stays unfused (fp16 w8a8, w8a16) all the same,
# and that DequantizeLinear then refuses the zero point it was given (an unfused layer multiplies in float:
# nothing to saturate, but a tied int8 head's Gemm then keeps the CPU's own kernel).
EXACT_INT8_ON_X86 = ("session.x64quantprecision", "1")


def wants_exact_int8(model) -> bool:
    """Whether to ask for EXACT_INT8_ON_X86: a graph (a ModelProto, or a bundle's graph file whose manifest
    says w8a8 from fp32) with a QuantizeLinear of fp32 activations, whose int8 weights' DequantizeLinear
    nodes all feed MatMul/Gemm (ONNX Runtime fuses those and converts the weights safely)."""
    import onnx
    if isinstance(model, (str, Path)):
        try:
            manifest = json.loads((Path(model).parent / "manifest.json").read_text(encoding="utf-8"))
            q = manifest.get("quantization") if isinstance(manifest, dict) else None
            if not isinstance(q, dict) or not q.get("activations") or manifest.get("dtype") != "fp32":
                return False
            model = onnx.load(str(model), load_external_data=False)
        except Exception:           # noqa: BLE001 - a damaged file: ONNX Runtime's load reports it
            return False
    if not isinstance(model, onnx.ModelProto):
        return False
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    users: dict[str, set[str]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, set()).add(n.op_type)
    int8_weights = [n for n in g.node if n.op_type == "DequantizeLinear" and types.get(n.input[0]) == onnx.TensorProto.INT8]
    fp32_activations = any(n.op_type == "QuantizeLinear" and types.get(n.input[1]) == onnx.TensorProto.FLOAT
                           for n in g.node)
    return fp32_activations and all(users.get(n.output[0], set()) <= {"MatMul", "Gemm"} for n in int8_weights)


def ask_exact_int8(options) -> None:
    """Set EXACT_INT8_ON_X86 on `options` (once: ONNX Runtime warns when an entry is set again)."""
    try:
        if options.get_session_config_entry(EXACT_INT8_ON_X86[0]) == EXACT_INT8_ON_X86[1]:
            return
    except Exception:               # noqa: BLE001 - onnxruntime raises a plain error for a missing entry
        pass
    options.add_session_config_entry(*EXACT_INT8_ON_X86)


_shared_pool_made = False           # True once the process's shared CPU thread pool was asked for


def shared_pool(threads: int | None) -> None:
    """Ask ONNX Runtime for the process's one shared CPU thread pool (`threads` intra-op threads, None: all
    cores) the first time; later calls keep the first size. Once the pool exists ONNX Runtime refuses
    sessions with threads of their own, so every later session uses it."""
    global _shared_pool_made
    if not _shared_pool_made:
        from onnxruntime.capi import _pybind_state
        _pybind_state.set_global_thread_pool_sizes(threads or 0, 1)
        _shared_pool_made = True


def uses_shared_pool() -> bool:
    """Whether this process's sessions run on the shared thread pool (see shared_pool)."""
    return _shared_pool_made


def session_options(threads: int | None = None, prepack: bool = True, warnings: bool = True, shared: bool = False):
    """Full graph optimization, `threads` intra-op threads (None: all cores), one inter-op thread.
    prepack=False keeps ONNX Runtime from making packed copies of the weights;
    warnings=False hides ONNX Runtime's warnings (used when running graphs held in memory);
    shared=True: the session runs on the process's shared thread pool (`shared_pool`; RunOptions.shared_threads
    says when) instead of threads of its own; once that pool exists every session does."""
    import onnxruntime as ort
    if threads is not None and threads < 0:
        raise UserError(f"--threads must be at least 1 (got {threads})")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not warnings:
        options.log_severity_level = 3
    if shared or uses_shared_pool():
        shared_pool(threads)
        options.use_per_session_threads = False
    else:
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def open_session(model: str | Path | bytes, options, device: str = "cpu", name: str | Path | None = None,
                 cuda_graph: bool = False, edit=None):
    """An InferenceSession of a graph file (or serialized model bytes); a graph ONNX Runtime cannot
    load becomes a BundleError naming `name` (default: the file). cuda_graph: see providers(). A w8a8
    bundle's graph gets exact int8 products on every x86 CPU (EXACT_INT8_ON_X86). edit(model): changes
    a graph file's ModelProto in memory before the session is made (nodes the runtime appends)."""
    import onnxruntime as ort
    if device == "cpu" and wants_exact_int8(model):
        ask_exact_int8(options)
    if isinstance(model, (str, Path)) and (device == "cuda" or edit is not None):
        name, model = name or model, _edited(model, options, device, edit)
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                    providers=providers(device, cuda_graph))
    except (BundleError, UserError):
        raise
    except Exception as e:
        raise BundleError(f"{name or model}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None


def _edited(path: str | Path, options, device: str, edit):
    """The graph file, or its bytes changed by `edit` and, on CUDA, rewritten where ONNX Runtime's CUDA
    provider lacks a kernel (runtime/cuda_compat.py); the external data still read from the file's folder."""
    import onnx
    from .cuda_compat import dequantize_blocks_by_hand
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:                   # noqa: BLE001 - unreadable here: ONNX Runtime's own load reports it
        return path
    changed = device == "cuda" and dequantize_blocks_by_hand(model) > 0
    if edit is not None:
        edit(model)
    if not changed and edit is None:
        return path
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     str(Path(path).parent.resolve()))
    return model.SerializeToString()


def check_io(session, graph: dict, path: str | Path, extra: dict | None = None) -> None:
    """The graph file's inputs and outputs must be the ones manifest.json describes (a graph swapped
    for another, or an edited manifest, would otherwise fail deep inside a run); `extra`: what the
    runtime appended to the graph in memory (same form)."""
    for side, got in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        want = {x["name"] for x in graph.get(side, []) + (extra or {}).get(side, [])}
        have = {x.name for x in got}
        if want and have != want:
            odd = sorted(have - want) or sorted(want - have)
            raise BundleError(f"{path}: the graph's {side} disagree with manifest.json "
                              f"({'unexpected' if have - want else 'missing'}: {', '.join(odd[:4])})")
