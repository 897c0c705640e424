"""One door to TensorRT: which flavour is installed, and the few calls whose spelling differs.

Three flavours are supported: TensorRT 10.x (Jetson stays there), TensorRT 11.x, and TensorRT for
RTX (`tensorrt_rtx_bindings`). They share almost all of the Python API; what differs is handled
here and only here, so tests/test_engines_compat.py can run the functions below against the real
bindings of each version (imported over stub libraries) and prove they touch only names that exist:

* strong typing is opt-in on 10.x (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`), always on in
  11.x and RTX (the flag is ignored there), so we set it on 10.x only and never set precision flags;
* RTX compiles for explicit compute capabilities (`ComputeCapability.SM89`, ...) or, with none
  set, for every GPU it supports; `CURRENT` needs a GPU, so we never use it;
* RTX has no timing cache (attaching one forces a GPU query) but a runtime cache of JIT kernels;
* `get_device_memory_size_for_profile_v2` replaced the unsuffixed call (removed in 11.0);
* RTX creates execution contexts from an `IRuntimeConfig`, TensorRT from an allocation strategy.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from .errors import EngineError
from .log import log

FLAVOURS = ("tensorrt", "tensorrt_rtx")

INSTALL_HINT = ("install TensorRT for RTX with `pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings` "
                "(builds on any machine, runs on RTX/Ampere+ GPUs), or TensorRT 10/11 with `pip install tensorrt` "
                "on a machine with an NVIDIA GPU (on Jetson, use the python3-libnvinfer that JetPack ships)")

# numpy dtype names for TensorRT's DataType members
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
           "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8_e4m3", "INT4": "int4", "FP4": "fp4"}


@dataclass(frozen=True)
class TensorRT:
    mod: object          # the bindings module
    flavour: str         # "tensorrt" | "tensorrt_rtx"
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt_rtx"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def label(self) -> str:
        return f"{'TensorRT-RTX' if self.is_rtx else 'TensorRT'} {self.version}"


def _import_full():
    return importlib.import_module("tensorrt")


def _import_rtx():
    importlib.import_module("tensorrt_rtx_libs")          # loads libtensorrt_rtx.so before the bindings
    return importlib.import_module("tensorrt_rtx_bindings")


def load(flavour: str = "auto") -> TensorRT:
    """The installed TensorRT: `auto` prefers full TensorRT, then TensorRT-RTX."""
    if flavour not in ("auto", *FLAVOURS):
        raise EngineError(f"unknown --trt {flavour!r} (choose tensorrt or tensorrt_rtx)")
    tried = []
    for name, importer in (("tensorrt", _import_full), ("tensorrt_rtx", _import_rtx)):
        if flavour not in ("auto", name):
            continue
        try:
            mod = importer()
        except (ImportError, OSError) as e:     # OSError: bindings present, libraries missing
            tried.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        return TensorRT(mod, name, str(mod.__version__))
    what = "TensorRT" if flavour == "auto" else flavour
    raise EngineError(f"{what} is not installed ({'; '.join(tried)}): {INSTALL_HINT}")


def alias_for_polygraphy(tensorrt: TensorRT) -> None:
    """Polygraphy imports `tensorrt_rtx` (a thin sdist over the bindings); give it the bindings we loaded."""
    if tensorrt.is_rtx:
        sys.modules.setdefault("tensorrt_rtx", tensorrt.mod)


# -- logging -------------------------------------------------------------------------------------------
_LOGGERS: dict[str, object] = {}


def logger(tensorrt: TensorRT, verbose: bool = False):
    """The process-wide logger (TensorRT keeps the first one it is given and ignores later ones).

    It keeps every warning and error so a failure can be explained in one line (our own message);
    with `verbose` it also prints them as they come.
    """
    trt_logger = _LOGGERS.get(tensorrt.flavour)
    if trt_logger is None:
        base = tensorrt.mod.ILogger

        class Logger(base):
            def __init__(self):
                base.__init__(self)
                self.verbose = False
                self.messages: list[tuple[str, str]] = []

            def log(self, severity, msg):
                level = str(severity).rsplit(".", 1)[-1]
                if level in ("INTERNAL_ERROR", "ERROR", "WARNING"):
                    self.messages.append((level, msg))
                if self.verbose and level != "VERBOSE":
                    log.info(f"[{tensorrt.label} {level.lower()}] {msg}")

        trt_logger = _LOGGERS[tensorrt.flavour] = Logger()
    trt_logger.verbose = verbose
    return trt_logger


def last_error(tensorrt: TensorRT) -> str:
    trt_logger = _LOGGERS.get(tensorrt.flavour)
    errors = [m for level, m in (trt_logger.messages if trt_logger else []) if level != "WARNING"]
    return " ".join(errors[-1].split()) if errors else "no message from TensorRT"


# -- building ------------------------------------------------------------------------------------------
def network_flags(tensorrt: TensorRT) -> int:
    """Strongly typed everywhere: opt-in on 10.x, always on (flag ignored) in 11.x and RTX."""
    flag = getattr(tensorrt.mod.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if not tensorrt.is_rtx and tensorrt.major == 10 and flag is not None:
        return 1 << int(flag)
    return 0


def is_strongly_typed(tensorrt: TensorRT, network) -> bool:
    flag = getattr(tensorrt.mod.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return True if (tensorrt.is_rtx or tensorrt.major >= 11 or flag is None) else bool(network.get_flag(flag))


@dataclass
class ParseProblem:
    node: str
    op: str
    desc: str

    def __str__(self) -> str:
        return f"node {self.node or '?'!r} ({self.op or '?'}): {' '.join(self.desc.split())}"


def parse_onnx(tensorrt: TensorRT, network, trt_logger, path) -> tuple[object, list[ParseProblem]]:
    """Parse from the file so external weights resolve next to it (they are mapped, not copied)."""
    parser = tensorrt.mod.OnnxParser(network, trt_logger)
    ok = parser.parse_from_file(str(path))
    problems = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        problems.append(ParseProblem(e.node_name(), e.node_operator(), e.desc()))
    if not ok and not problems:
        problems.append(ParseProblem("", "", last_error(tensorrt)))
    return parser, ([] if ok else problems)


def compute_capabilities(tensorrt: TensorRT, wanted: list[str]) -> list:
    """'8.9' / 'sm89' -> ComputeCapability.SM89 (TensorRT-RTX only)."""
    enum = getattr(tensorrt.mod, "ComputeCapability", None)
    if enum is None:
        raise EngineError(f"--compute-capability is for TensorRT-RTX; {tensorrt.label} builds for the GPU it runs on")
    known = {k[2:]: v for k, v in enum.__members__.items() if k.startswith("SM")}
    out = []
    for cc in wanted:
        key = cc.lower().replace("sm", "").replace(".", "").strip()
        if key not in known:
            raise EngineError(f"unknown compute capability {cc!r} for {tensorrt.label} (choose from "
                              f"{', '.join(k[:-1] + '.' + k[-1] for k in known)})")
        out.append(known[key])
    return out


def configure(tensorrt: TensorRT, config, *, workspace: int | None, opt_level: int | None, ccs: list) -> None:
    config.profiling_verbosity = tensorrt.mod.ProfilingVerbosity.DETAILED   # names and tactics for the inspector
    if workspace:
        config.set_memory_pool_limit(tensorrt.mod.MemoryPoolType.WORKSPACE, int(workspace))
    if opt_level is not None:
        config.builder_optimization_level = int(opt_level)
    if tensorrt.is_rtx and ccs:
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            config.set_compute_capability(cc, i)


def has_timing_cache(tensorrt: TensorRT) -> bool:
    """RTX: a timing cache has no effect and forces a GPU query, which breaks CPU-only builds."""
    return not tensorrt.is_rtx


def attach_timing_cache(tensorrt: TensorRT, config, blob: bytes):
    """Reuse a saved timing cache; one from another GPU or version is refused, then start an empty one."""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, False) and blob:
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def progress_base(tensorrt: TensorRT):
    return getattr(tensorrt.mod, "IProgressMonitor", None)


def attach_progress(config, monitor) -> None:
    config.progress_monitor = monitor


def new_network(tensorrt: TensorRT, trt_logger):
    """(builder, network, config) for a strongly typed network."""
    builder = tensorrt.mod.Builder(trt_logger)
    return builder, builder.create_network(network_flags(tensorrt)), builder.create_builder_config()


def add_profile(tensorrt: TensorRT, builder, config, shapes: dict[str, tuple]) -> None:
    p = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        p.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(p)


def dtype_name(tensorrt: TensorRT, dt) -> str:
    return _DTYPES.get(str(dt).rsplit(".", 1)[-1], str(dt).rsplit(".", 1)[-1].lower())


def network_io(tensorrt: TensorRT, network) -> list[dict]:
    out = []
    for side, n, get in (("input", network.num_inputs, network.get_input),
                         ("output", network.num_outputs, network.get_output)):
        for i in range(n):
            x = get(i)
            out.append({"name": x.name, "mode": side, "dtype": dtype_name(tensorrt, x.dtype),
                        "shape": list(x.shape)})
    return out


def network_layers(tensorrt: TensorRT, network) -> list[dict]:
    """Each layer's type and output types. In a strongly typed network these are the precisions the
    engine runs (the builder may fuse layers but may not change a tensor's type)."""
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [dtype_name(tensorrt, layer.get_output(j).dtype) for j in range(layer.num_outputs)]
        layers.append({"name": layer.name, "type": str(layer.type).rsplit(".", 1)[-1], "outputs": outputs})
    return layers


def build(tensorrt: TensorRT, builder, network, config):
    """The serialized plan (an IHostMemory, buffer protocol), or None when the build failed."""
    return builder.build_serialized_network(network, config)


# -- running -------------------------------------------------------------------------------------------
def runtime(tensorrt: TensorRT, trt_logger):
    return tensorrt.mod.Runtime(trt_logger)


def engine_validity(tensorrt: TensorRT, trt_runtime, plan) -> str | None:
    """RTX only: None when the plan can run on this machine, else TensorRT's reason."""
    check = getattr(trt_runtime, "get_engine_validity", None)
    if check is None:
        return None
    validity, diagnostics = check(plan)
    if str(validity).endswith("VALID") and not str(validity).endswith("INVALID"):
        return None
    enum = getattr(tensorrt.mod, "EngineInvalidityDiagnostics", None)
    reasons = [k for k, v in (enum.__members__.items() if enum else []) if int(v) and int(diagnostics) & int(v)]
    return f"{str(validity).rsplit('.', 1)[-1].lower()}" + (f" ({', '.join(reasons).lower()})" if reasons else "")


def deserialize(tensorrt: TensorRT, trt_runtime, plan):
    return trt_runtime.deserialize_cuda_engine(plan)


def profile_memory(tensorrt: TensorRT, engine, index: int) -> int:
    get = getattr(engine, "get_device_memory_size_for_profile_v2", None) or engine.get_device_memory_size_for_profile
    return int(get(index))


def create_context(tensorrt: TensorRT, engine, profile_index: int, scratch: int, scratch_bytes: int, stream: int,
                   runtime_cache=None, cuda_graphs: bool = False):
    """A context pinned to one profile, on activation memory we provide, so the contexts of the two
    profiles share one scratch buffer instead of holding one each. None when TensorRT refuses."""
    strategy = tensorrt.mod.ExecutionContextAllocationStrategy.USER_MANAGED
    if tensorrt.is_rtx:
        runtime_config = engine.create_runtime_config()
        runtime_config.set_execution_context_allocation_strategy(strategy)
        if runtime_cache is not None:
            runtime_config.set_runtime_cache(runtime_cache)
        if cuda_graphs:
            runtime_config.cuda_graph_strategy = tensorrt.mod.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        ctx = engine.create_execution_context(runtime_config)
    else:
        ctx = engine.create_execution_context(strategy)
    if ctx is None:
        return None
    ctx.set_device_memory(scratch, scratch_bytes)
    if not ctx.set_optimization_profile_async(profile_index, stream):
        return None
    return ctx


def serialize_runtime_cache(cache) -> bytes:
    return bytes(memoryview(cache.serialize()))


def new_runtime_cache(tensorrt: TensorRT, engine, blob: bytes | None):
    """RTX's cache of JIT-compiled kernels (None on TensorRT, which compiles ahead of time)."""
    if not tensorrt.is_rtx:
        return None
    cache = engine.create_runtime_config().create_runtime_cache()
    if blob:
        cache.deserialize(blob)
    return cache


def engine_io(tensorrt: TensorRT, engine) -> list[dict]:
    """Names, modes, dtypes, shapes and per-profile [min, opt, max] of every I/O tensor of an engine."""
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = str(engine.get_tensor_mode(name)).endswith("INPUT")
        item = {"name": name, "mode": "input" if is_input else "output",
                "dtype": dtype_name(tensorrt, engine.get_tensor_dtype(name)),
                "shape": list(engine.get_tensor_shape(name))}
        if is_input:
            item["profiles"] = [[list(d) for d in engine.get_tensor_profile_shape(name, p)]
                                for p in range(engine.num_optimization_profiles)]
        out.append(item)
    return out


def inspector_json(tensorrt: TensorRT, engine, context=None) -> str:
    insp = engine.create_engine_inspector()
    if context is not None:
        insp.execution_context = context
    return insp.get_engine_information(tensorrt.mod.LayerInformationFormat.JSON)
