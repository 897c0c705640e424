"""Does TensorRT-RTX take our Q/DQ graphs? Parse + ahead-of-time build on the CPU (no GPU needed).

TensorRT-RTX compiles kernels just in time on the GPU, so an AOT build that succeeds here proves the
parser accepts the graph and the builder accepts its types and Q/DQ placement for the target
compute capabilities; it does not prove which kernels will run (see docs/CALIBRATION.md).
"""
from __future__ import annotations

import time
from pathlib import Path

from ..runtime import trt_compat as compat
from ..runtime.log import log
from ..runtime.errors import UserError


def _rtx() -> compat.TensorRT:
    try:
        return compat.load("tensorrt_rtx")
    except ValueError as e:
        raise UserError(f"--target trt-rtx needs TensorRT-RTX (pip install -e '.[trt-rtx]'): {e}") from None


# Combinations the TensorRT-RTX 1.7 builder refuses, found by AOT builds of our quantized graphs
# on CPU (docs/CALIBRATION.md); checked before any calibration work is done.
def check_scheme_supported(scheme: str, dtype: str | None, ccs) -> None:
    ccs = [c.lower().replace("sm", "").replace(".", "").strip() for c in ccs]     # SM75, sm75, 7.5 -> 75
    if "75" in ccs and dtype == "fp32":
        raise UserError(f"TensorRT-RTX cannot build {scheme} from an fp32 bundle for SM75 (Turing has no FP32 "
                        f"GEMM in TensorRT-RTX); export with --dtype fp16 or drop SM75")


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
    """Parse one ONNX file (external data next to it) and build it AOT with one optimization profile;
    raises ValueError on failure. The TensorRT calls are runtime/trt_compat.py's."""
    tensorrt = _rtx()
    targets = compat.compute_capabilities(tensorrt, list(ccs))
    trt_logger = compat.logger(tensorrt)
    trt_logger.messages.clear()
    builder, network, config = compat.new_network(tensorrt, trt_logger)
    t0 = time.perf_counter()
    parser, problems = compat.parse_onnx(tensorrt, network, trt_logger, path)     # keep `parser`: it owns the weights
    if problems:
        raise UserError(f"TensorRT-RTX cannot parse {Path(path).name}: {problems[0]}")
    compat.configure(tensorrt, config, workspace=None, opt_level=None, ccs=targets)
    compat.add_profile(tensorrt, builder, config, shapes)
    serialized = compat.build(tensorrt, builder, network, config)
    if serialized is None:
        raise UserError(f"TensorRT-RTX cannot build {Path(path).name} for {', '.join(ccs)}: {compat.last_error(tensorrt)}")
    return {"ok": True, "compute_capabilities": list(ccs), "layers": network.num_layers, "plan_bytes": serialized.nbytes,
            "seconds": round(time.perf_counter() - t0, 1)}


def build_bundle_graphs(folder: str | Path, manifest: dict, ccs=("SM89",), kinds=("prefill", "decode"),
                        progress: bool = False) -> dict:
    out = {"tensorrt_rtx": _rtx().version}
    for kind in kinds:
        if kind not in manifest["graphs"]:
            continue
        if progress:
            log.info(f"TensorRT-RTX: building {kind} for {', '.join(ccs)} (CPU, ahead of time)")
        out[kind] = build_graph(Path(folder) / manifest["graphs"][kind]["file"], profile_shapes(manifest, kind), ccs)
    return out
