"""Does TensorRT-RTX take our Q/DQ graphs? Parse + ahead-of-time build on the CPU (no GPU needed).

TensorRT-RTX compiles kernels just in time on the GPU, so an AOT build that succeeds here proves the
parser accepts the graph and the builder accepts its types and Q/DQ placement for the target
compute capabilities; it does not prove which kernels will run (see docs/CALIBRATION.md).
"""
from __future__ import annotations

import time
from pathlib import Path

_LOGGER = None
_TRT = None


def import_rtx():
    global _TRT
    if _TRT is None:
        try:
            import tensorrt_rtx_libs  # noqa: F401  (loads libtensorrt_rtx)
            import tensorrt_rtx_bindings as trt
        except ImportError as e:
            raise ValueError(f"--target trt-rtx needs TensorRT-RTX (pip install -e '.[trt-rtx]'): {e}") from None
        _TRT = trt
    return _TRT


def _logger():
    """TensorRT keeps one logger per process: create it once and collect its messages."""
    global _LOGGER
    trt = import_rtx()
    if _LOGGER is None:
        class Collect(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages = []

            def log(self, severity, msg):
                if severity <= trt.ILogger.Severity.ERROR:
                    self.messages.append(msg)
        _LOGGER = Collect()
    return _LOGGER


# Combinations the TensorRT-RTX 1.7 builder refuses, found by AOT builds of our quantized graphs
# on CPU (docs/CALIBRATION.md); checked before any calibration work is done.
def check_scheme_supported(scheme: str, dtype: str | None, ccs) -> None:
    ccs = [c.upper() for c in ccs]
    if "SM75" in ccs and dtype == "fp32":
        raise ValueError(f"TensorRT-RTX cannot build {scheme} from an fp32 bundle for SM75 (Turing has no FP32 "
                         f"GEMM in TensorRT-RTX); export with --dtype fp16 or drop SM75")


def compute_capability(trt, name: str):
    cc = getattr(trt.ComputeCapability, name.upper(), None)
    if cc is None or name.upper() in ("NONE", "CURRENT"):
        known = [n for n in dir(trt.ComputeCapability) if n.startswith("SM")]
        raise ValueError(f"unknown compute capability {name!r} (TensorRT-RTX knows {', '.join(known)})")
    return cc


def profile_shapes(manifest: dict, kind: str, max_tokens: int = 256) -> dict:
    """(min, opt, max) per input of one graph: batch 1..max_batch, sequences up to max_seq."""
    B, T = manifest["max_batch"], manifest["max_seq"]
    n_kv, hd = manifest["spec"]["n_kv_heads"], manifest["spec"]["head_dim"]
    S = min(T, max_tokens)
    shapes = {}
    for inp in manifest["graphs"][kind]["inputs"]:
        name = inp["name"]
        if kind == "decode":
            if name == "input_ids":
                shapes[name] = ((1, 1), (1, 1), (B, min(16, T - 1)))
            elif name == "attention_mask":
                shapes[name] = ((1, 2), (1, S), (B, T))
            else:
                shapes[name] = ((1, 1, n_kv, hd), (S - 1, 1, n_kv, hd), (T - 1, B, n_kv, hd))
        else:
            shapes[name] = ((1, 1), (1, S), (B, T))
    return shapes


def build_graph(path: str | Path, shapes: dict, ccs=("SM89",)) -> dict:
    """Parse one ONNX file (external data next to it) and build it AOT; raises ValueError on failure."""
    trt = import_rtx()
    log = _logger()
    log.messages.clear()
    builder = trt.Builder(log)
    net = builder.create_network(0)            # strongly typed is the default (and only) mode in RTX
    parser = trt.OnnxParser(net, log)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(path)):
        errs = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        raise ValueError(f"TensorRT-RTX cannot parse {Path(path).name}: {(errs or log.messages or ['?'])[0]}")
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = len(ccs)
    for i, name in enumerate(ccs):
        cfg.set_compute_capability(compute_capability(trt, name), i)
    prof = builder.create_optimization_profile()
    for name, (mn, op, mx) in shapes.items():
        prof.set_shape(name, mn, op, mx)
    cfg.add_optimization_profile(prof)
    plan = builder.build_serialized_network(net, cfg)
    if plan is None:
        msg = log.messages[-1] if log.messages else "no message"
        raise ValueError(f"TensorRT-RTX cannot build {Path(path).name} for {', '.join(ccs)}: {' '.join(msg.split())}")
    return {"ok": True, "compute_capabilities": list(ccs), "layers": net.num_layers, "plan_bytes": plan.nbytes,
            "seconds": round(time.perf_counter() - t0, 1)}


def build_bundle_graphs(folder: str | Path, manifest: dict, ccs=("SM89",), kinds=("prefill", "decode"),
                        progress: bool = False) -> dict:
    import sys
    trt = import_rtx()
    out = {"tensorrt_rtx": getattr(trt, "__version__", "?")}
    for kind in kinds:
        if kind not in manifest["graphs"]:
            continue
        if progress:
            print(f"TensorRT-RTX: building {kind} for {', '.join(ccs)} (CPU, ahead of time)", file=sys.stderr, flush=True)
        out[kind] = build_graph(Path(folder) / manifest["graphs"][kind]["file"], profile_shapes(manifest, kind), ccs)
    return out
