"""`ardeploy build`: a bundle's decode graph -> one TensorRT engine with a prefill and a decode profile.

Why one engine from the decode graph: two engines (prefill + decode) would each carry every weight,
doubling GPU memory. The decode graph with P = 0 past positions is the prefill graph, so one engine
with two optimization profiles serves both phases and stores the weights once (plan bytes about
1.0x the weight bytes; see engines/profiles.py for the shape ranges and why they are what they are).

Precision is the graph's: networks are strongly typed, so an FP16 engine comes from an FP16 bundle
(`ardeploy export --dtype fp16`), never from builder flags (TensorRT 11 and TensorRT-RTX have none).

Everything is written into a temporary folder inside the bundle and renamed to `engines/` at the
end, so a failed or interrupted build leaves the previous engines (or none) in place.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..runtime import atomic
from ..runtime import trt_compat as compat
from ..runtime.bundle import SCHEME_PRECISION, Bundle
from ..runtime.cuda import query_gpu
from ..runtime.engine_record import FORMAT, FORMAT_VERSION, GRAPH, INT8, engines_dir
from ..runtime.errors import EngineError
from ..runtime.files import cache_dir, sha256_file
from ..runtime.log import log, progress_enabled
from . import layers, profiles, record
from .progress import make_monitor

PLAN = "decode.plan"      # the engine file: TensorRT's serialized engine ("plan"), built from the GRAPH graph
PLAN_RULE = 1.15          # plan bytes on disk must stay under this many times the weight bytes
INT4 = "int4"             # a w4a16 bundle (INT4 weights, blocked DequantizeLinear); float parts keep the bundle's dtype
QUANTIZED = {precision: tuple(s for s, p in SCHEME_PRECISION.items() if p == precision)
             for precision in (INT8, INT4)}                    # --precision -> the calibrate schemes it builds


def quantized_precision(scheme: str) -> str:
    """The --precision that builds a bundle calibrated with `scheme` (the bundle format's table)."""
    return SCHEME_PRECISION.get(scheme, INT8)


def parse_size(text: str | int | None) -> int | None:
    """'4GiB', '512MiB', '1e9' -> bytes."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    for unit, mult in units.items():
        if s.lower().endswith(unit):
            s, scale = s[: -len(unit)], mult
            break
    else:
        scale = 1
    try:
        n = int(float(s) * scale)
    except ValueError:
        raise EngineError(f"--workspace {text!r} is not a size (e.g. 4GiB, 512MiB)") from None
    if n <= 0:
        raise EngineError(f"--workspace must be positive (got {text!r})")
    return n


def reexport_hint(bundle: Bundle, precision: str) -> str:
    m = bundle.manifest
    src = m.get("source", {}).get("path", "SOURCE")
    out = f"{str(bundle.path).rstrip('/')}-{precision}"
    return (f"ardeploy export {src} --dtype {precision} --max-seq {m['max_seq']} --max-batch {m['max_batch']} "
            f"--out {out}")


def check_request(bundle: Bundle, precision: str, max_seq: int | None,
                  max_batch: int | None) -> tuple[int, int]:
    """Refuse what cannot be built before TensorRT is even imported; returns (max_seq, max_batch)."""
    m = bundle.manifest
    if precision not in (*record.PRECISIONS, *QUANTIZED):
        raise EngineError(f"unknown --precision {precision!r} (choose {', '.join(record.PRECISIONS)}, "
                          f"{', '.join(QUANTIZED)})")
    if not m.get("graphs"):
        raise EngineError(f"{bundle.path}: the bundle has no graphs to build from (re-export it with `ardeploy export`)")
    if not bundle.has_graph(GRAPH):
        raise EngineError(f"{bundle.path}: the bundle has no {GRAPH} graph (it has: {', '.join(m['graphs'])}); "
                          f"re-export it with `ardeploy export`")
    quant = m.get("quantization")
    if precision in QUANTIZED and not quant:
        raise EngineError(f"{bundle.path}: --precision {precision} needs a calibrated bundle with Q/DQ graphs: "
                          f"make one with `ardeploy calibrate {bundle.path} --data calib.txt --scheme {QUANTIZED[precision][0]} "
                          f"--out {str(bundle.path).rstrip('/')}-{precision}`")
    if quant and precision != quantized_precision(quant["scheme"]):
        raise EngineError(f"{bundle.path}: the bundle is quantized ({quant['scheme']}); build it with --precision "
                          f"{quantized_precision(quant['scheme'])}")
    if precision not in QUANTIZED and m.get("dtype") != precision:
        raise EngineError(f"{bundle.path}: the bundle's graphs are {m.get('dtype')}, and an engine's precision is its "
                          f"graph's (strongly typed): export {precision} graphs with `{reexport_hint(bundle, precision)}` "
                          f"and build that bundle")
    max_seq = m["max_seq"] if max_seq is None else int(max_seq)
    max_batch = m["max_batch"] if max_batch is None else int(max_batch)
    if max_seq > m["max_seq"]:
        raise EngineError(f"--max-seq {max_seq} exceeds the bundle's max_seq {m['max_seq']} (re-export with a larger --max-seq)")
    if max_batch > m["max_batch"]:
        raise EngineError(f"--max-batch {max_batch} exceeds the bundle's max_batch {m['max_batch']} "
                          f"(re-export with a larger --max-batch)")
    if max_seq < 2 or max_batch < 1:
        raise EngineError(f"--max-seq must be at least 2 and --max-batch at least 1 (got {max_seq}, {max_batch})")
    return max_seq, max_batch


def check_network_io(net_io: list[dict], graph: dict, file: str) -> None:
    """The parsed network's I/O must be the manifest's contract: names, types, fixed and dynamic dims."""
    want = {x["name"]: (side[:-1], x) for side in ("inputs", "outputs") for x in graph[side]}
    got = {x["name"]: x for x in net_io}
    if set(want) != set(got):
        raise EngineError(f"{file}: TensorRT sees tensors {sorted(set(got) ^ set(want))} that differ from "
                          f"manifest.json's {GRAPH} graph; re-export the bundle")
    for name, (mode, w) in want.items():
        g = got[name]
        shape = [-1 if isinstance(d, str) else d for d in w["shape"]]
        if g["mode"] != mode or g["dtype"] != w["dtype"] or list(g["shape"]) != shape:
            raise EngineError(f"{file}: TensorRT sees {name} as {g['mode']} {g['dtype']} {g['shape']}, manifest.json "
                              f"says {mode} {w['dtype']} {shape}; re-export the bundle")


@dataclass(frozen=True)
class BuildRequest:
    """What to build, checked in full before TensorRT is imported."""
    bundle: Bundle
    precision: str
    max_seq: int
    max_batch: int
    opt_seq: int
    shape_profiles: list[profiles.Profile]      # prefill, decode
    workspace: int | None
    opt_level: int | None

    @property
    def graph(self) -> dict:
        return self.bundle.graph(GRAPH).raw

    @property
    def onnx_path(self) -> Path:
        return self.bundle.graph_path(GRAPH)


@dataclass
class ParsedNetwork:
    """The strongly typed network TensorRT parsed from the graph, and what we learned from it."""
    builder: object
    network: object
    config: object
    parser: object              # kept alive: it owns the weights the network refers to
    io: list[dict]              # the network's I/O tensors (checked against the manifest)
    report: dict                # layers.json when no GPU can inspect the engine


@dataclass
class BuiltPlan:
    """The plan written into the engines folder, and what was learned from it."""
    nbytes: int
    seconds: float
    engine_io: list[dict] | None      # None when this machine cannot load the plan
    report: dict                      # layers.json as written


def _build_request(bundle_path, precision: str, max_seq: int | None, max_batch: int | None, opt_seq: int,
                   workspace: str | int | None, opt_level: int | None) -> BuildRequest:
    """The bundle and every option checked; the defaults filled in from the bundle."""
    bundle = Bundle.load(bundle_path)
    max_seq, max_batch = check_request(bundle, precision, max_seq, max_batch)
    opt_seq = min(int(opt_seq), max_seq)
    try:
        shape_profiles = profiles.optimization_profiles(max_seq, max_batch, opt_seq)
    except ValueError as e:
        raise EngineError(str(e)) from None
    workspace = parse_size(workspace)
    if opt_level is not None and not 0 <= int(opt_level) <= 5:
        raise EngineError(f"--opt-level must be between 0 and 5 (got {opt_level})")
    return BuildRequest(bundle, precision, max_seq, max_batch, opt_seq, shape_profiles, workspace, opt_level)


def _target(tensorrt: compat.TensorRT, ccs_wanted: list[str] | None) -> tuple[list, dict]:
    """(compute capabilities to compile for, engines.json `target`)."""
    if tensorrt.is_rtx:
        ccs = compat.compute_capabilities(tensorrt, ccs_wanted) if ccs_wanted else []
        names = [str(c).rsplit(".", 1)[-1][2:] for c in ccs]
        return ccs, {"gpu": "any", "compute_capability": [n[:-1] + "." + n[-1] for n in names] if ccs else "any"}
    if ccs_wanted:
        compat.compute_capabilities(tensorrt, ccs_wanted)          # raises: not an RTX option
    gpu = query_gpu()
    if gpu is None:
        raise EngineError(f"{tensorrt.label} builds engines on the GPU they will run on, and no NVIDIA GPU is visible "
                          f"here: build on the target machine, or use --trt tensorrt_rtx (builds on a CPU)")
    return [], {"gpu": gpu[0], "compute_capability": gpu[1]}


def _parse_network(tensorrt: compat.TensorRT, trt_logger, request: BuildRequest) -> ParsedNetwork:
    """Parse the graph into a strongly typed network whose I/O and layer precisions are what was asked for."""
    onnx_path = request.onnx_path
    builder, network, config = compat.new_network(tensorrt, trt_logger)
    parser, problems = compat.parse_onnx(tensorrt, network, trt_logger, onnx_path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise EngineError(f"{onnx_path.name}: {tensorrt.label}'s ONNX parser rejects {problems[0]}{more}")
    if not compat.is_strongly_typed(tensorrt, network):
        raise EngineError(f"{tensorrt.label} did not create a strongly typed network")
    net_io = compat.network_io(tensorrt, network)
    check_network_io(net_io, request.graph, onnx_path.name)
    report = layers.network_report(compat.network_layers(tensorrt, network))
    float_precision = request.bundle.manifest["dtype"] if request.precision in QUANTIZED else request.precision
    wrong = layers.precision_problems(report, float_precision)
    if wrong:
        raise EngineError(f"{onnx_path.name} is not a {request.precision} graph: {wrong[0]}"
                          + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    return ParsedNetwork(builder, network, config, parser, net_io, report)


def _configure(tensorrt: compat.TensorRT, parsed: ParsedNetwork, request: BuildRequest, ccs: list) -> None:
    compat.configure(tensorrt, parsed.config, workspace=request.workspace, opt_level=request.opt_level, ccs=ccs)
    for profile in request.shape_profiles:
        bad = profiles.inconsistencies(profile)
        if bad:
            raise EngineError(f"internal: inconsistent profile: {bad[0]}")
        compat.add_profile(tensorrt, parsed.builder, parsed.config, profile.shapes(request.graph["inputs"]))


def _attach_timing_cache(tensorrt: compat.TensorRT, config, target: dict,
                         timing_cache: str | Path | None) -> tuple[object, Path] | None:
    """(timing cache, file to save it to) when this flavour has one; it is reused across builds."""
    if not compat.has_timing_cache(tensorrt):
        if timing_cache:
            log.info(f"note: {tensorrt.label} has no timing cache (it would need a GPU at build time); ignoring "
                     f"--timing-cache. The runtime keeps its compiled kernels in engines/runtime.cache instead.")
        return None
    sm = target["compute_capability"].replace(".", "")
    cache_file = Path(timing_cache) if timing_cache else cache_dir() / f"trt-timing-{tensorrt.version}-sm{sm}.cache"
    cache_bytes = cache_file.read_bytes() if cache_file.exists() else b""
    return compat.attach_timing_cache(tensorrt, config, cache_bytes), cache_file


def _save_timing_cache(cache, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(bytes(memoryview(cache.serialize())))
        os.replace(tmp, path)
    except OSError as e:
        log.info(f"note: could not save the timing cache to {path} ({e.strerror})")


def _announce(tensorrt: compat.TensorRT, request: BuildRequest, target: dict) -> None:
    where = "any supported GPU" if target["compute_capability"] == "any" else \
        f"{target['gpu']} ({target['compute_capability']})"
    ranges = "; ".join(f"{p.name} S {p.dims['seq'][0]}..{p.dims['seq'][2]} P {p.dims['past_seq'][0]}.."
                       f"{p.dims['past_seq'][2]} B 1..{request.max_batch}" for p in request.shape_profiles)
    log.info(f"building {request.onnx_path.name} ({request.precision}) with {tensorrt.label} for {where}: "
             f"profiles {ranges}")


def _build_plan(tensorrt: compat.TensorRT, parsed: ParsedNetwork, show_progress: bool):
    """(plan, seconds): TensorRT's serialized engine, with progress bars while it builds."""
    monitor = make_monitor(compat.progress_base(tensorrt), enabled=show_progress)
    if monitor is not None:
        compat.attach_progress(parsed.config, monitor)
    started = time.perf_counter()
    try:
        plan = compat.build(tensorrt, parsed.builder, parsed.network, parsed.config)
    finally:
        if monitor is not None:
            monitor.close()
    seconds = time.perf_counter() - started
    if plan is None:
        raise EngineError(f"{tensorrt.label} could not build the engine: {compat.last_error(tensorrt)}")
    return plan, seconds


def _inspect_engine(tensorrt: compat.TensorRT, trt_logger, plan):
    """(engine I/O, inspector report) when this machine can load the engine, else (None, None)."""
    if query_gpu() is None:
        return None, None
    try:
        trt_runtime = compat.runtime(tensorrt, trt_logger)
        if compat.engine_validity(tensorrt, trt_runtime, plan) is not None:
            return None, None
        engine = compat.deserialize(tensorrt, trt_runtime, plan)
        if engine is None:
            return None, None
        return compat.engine_io(tensorrt, engine), layers.inspector_report(compat.inspector_json(tensorrt, engine))
    except Exception as e:                                   # report what we can; the plan itself is fine
        log.info(f"note: could not inspect the engine on this GPU ({e})")
        return None, None


def _write_plan(path: Path, plan) -> int:
    view = memoryview(plan)
    with open(path, "wb") as f:
        f.write(view)
    return view.nbytes


def _build_into(folder: Path, tensorrt: compat.TensorRT, trt_logger, parsed: ParsedNetwork, request: BuildRequest,
                show_progress: bool) -> BuiltPlan:
    """Build the plan and write it and layers.json into `folder`; the plan leaves memory on return."""
    plan, seconds = _build_plan(tensorrt, parsed, show_progress)
    nbytes = _write_plan(folder / PLAN, plan)
    engine_io, inspected = _inspect_engine(tensorrt, trt_logger, plan)
    if engine_io:
        check_network_io(engine_io, request.graph, PLAN)
    report = parsed.report if inspected is None else inspected
    (folder / layers.REPORT).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return BuiltPlan(nbytes, seconds, engine_io, report)


def _engines_record(request: BuildRequest, tensorrt: compat.TensorRT, target: dict, parsed: ParsedNetwork,
                    built: BuiltPlan) -> dict:
    """engines.json: what was built, from what, by which TensorRT, for which GPU."""
    m = request.bundle.manifest
    weight_bytes = m["weights"]["bytes"]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tensorrt": {"flavour": tensorrt.flavour, "version": tensorrt.version, "label": tensorrt.label},
        "target": target,
        "precision": request.precision, "graph_dtype": m["dtype"],
        "quantization": (m.get("quantization") or {}).get("scheme"),
        "max_seq": request.max_seq, "max_batch": request.max_batch, "opt_seq": request.opt_seq,
        "builder_optimization_level": request.opt_level, "workspace_bytes": request.workspace,
        "graphs": {request.onnx_path.name: sha256_file(request.onnx_path)},
        "weights": {"file": m["weights"]["file"], "bytes": weight_bytes},
        "source_sha256": m["source"].get("sha256"),
        "engines": [{"file": PLAN, "graph": GRAPH, "bytes": built.nbytes,
                     "profiles": [p.to_json(request.graph["inputs"]) for p in request.shape_profiles]}],
        "io": {"source": "engine" if built.engine_io else "network", "tensors": built.engine_io or parsed.io},
        "layers": {"file": layers.REPORT, "source": built.report["source"], "summary": layers.summary(built.report)},
        "plan_bytes": built.nbytes, "plan_to_weights": round(built.nbytes / weight_bytes, 4),
        "build_seconds": round(built.seconds, 2),
    }


def build_engines(bundle_path, precision: str, *, max_seq: int | None = None, max_batch: int | None = None,
                  opt_seq: int = 512, trt: str = "auto", timing_cache: str | Path | None = None,
                  workspace: str | int | None = None, compute_capability: list[str] | None = None,
                  opt_level: int | None = None, quiet: bool = False, verbose: bool = False) -> dict:
    """Build BUNDLE/engines/ and return the engines.json record. `trt` names the TensorRT flavour; `quiet`
    hides the progress bars (messages follow the level of runtime.log's logger); `verbose` prints TensorRT's own."""
    request = _build_request(bundle_path, precision, max_seq, max_batch, opt_seq, workspace, opt_level)
    # earlier engines are replaced, but only while their folder holds nothing but what ardeploy wrote
    replace = atomic.check_out(engines_dir(request.bundle), True, EngineError)
    tensorrt = compat.load(trt)
    ccs, target = _target(tensorrt, compute_capability)
    trt_logger = compat.logger(tensorrt, verbose)
    parsed = _parse_network(tensorrt, trt_logger, request)
    _configure(tensorrt, parsed, request, ccs)
    timing = _attach_timing_cache(tensorrt, parsed.config, target, timing_cache)
    _announce(tensorrt, request, target)
    with atomic.folder_written_whole(engines_dir(request.bundle), EngineError, replace=replace) as folder:
        built = _build_into(folder, tensorrt, trt_logger, parsed, request,
                            show_progress=not quiet and progress_enabled())
        rec = atomic.record_files(folder, _engines_record(request, tensorrt, target, parsed, built), record.RECORD)
        record.write(folder, rec)
    if timing is not None:
        _save_timing_cache(*timing)
    return rec


__all__ = ["build_engines", "PLAN_RULE", "INT4"]
