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
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ..runtime import atomic
from ..runtime.bundle import Bundle, BundleError
from . import compat, layers, profiles, record
from .errors import EngineError

GRAPH = "decode"
PLAN = "decode.plan"
PLAN_RULE = 1.15          # plan bytes on disk must stay under this many times the weight bytes


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("ARDEPLOY_CACHE") or Path.home() / ".cache" / "ardeploy")


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


def check_request(bundle: Bundle, precision: str, max_seq: int | None, max_batch: int | None) -> tuple[int, int]:
    """Refuse what cannot be built before TensorRT is even imported; returns (max_seq, max_batch)."""
    m = bundle.manifest
    if precision not in (*record.PRECISIONS, record.INT8):
        raise EngineError(f"unknown --precision {precision!r} (choose {', '.join(record.PRECISIONS)}, int8)")
    if not m.get("graphs"):
        raise EngineError(f"{bundle.path}: the bundle has no graphs to build from (re-export it with `ardeploy export`)")
    if not bundle.has_graph(GRAPH):
        raise EngineError(f"{bundle.path}: the bundle has no {GRAPH} graph (it has: {', '.join(m['graphs'])}); "
                          f"re-export it with `ardeploy export`")
    quant = m.get("quantization")
    if precision == record.INT8 and not quant:
        raise EngineError(f"{bundle.path}: --precision int8 needs a calibrated bundle with Q/DQ graphs: make one with "
                          f"`ardeploy calibrate {bundle.path} --data calib.txt --scheme w8a16 --out "
                          f"{str(bundle.path).rstrip('/')}-int8`")
    if quant and precision != record.INT8:
        raise EngineError(f"{bundle.path}: the bundle is quantized ({quant['scheme']}); build it with --precision int8")
    if precision != record.INT8 and m.get("dtype") != precision:
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


def _target(t: compat.TensorRT, ccs_wanted: list[str] | None) -> tuple[list, dict]:
    from ..runtime.backends.trt import query_gpu
    if t.is_rtx:
        ccs = compat.compute_capabilities(t, ccs_wanted) if ccs_wanted else []
        names = [str(c).rsplit(".", 1)[-1][2:] for c in ccs]
        return ccs, {"gpu": "any", "compute_capability": [n[:-1] + "." + n[-1] for n in names] if ccs else "any"}
    if ccs_wanted:
        compat.compute_capabilities(t, ccs_wanted)          # raises: not an RTX option
    gpu = query_gpu()
    if gpu is None:
        raise EngineError(f"{t.label} builds engines on the GPU they will run on, and no NVIDIA GPU is visible here: "
                          f"build on the target machine, or use --trt tensorrt_rtx (builds on a CPU)")
    return [], {"gpu": gpu[0], "compute_capability": gpu[1]}


def _inspect_engine(t, log, plan, quiet: bool):
    """(engine I/O, inspector report) when this machine can load the engine, else (None, None)."""
    from ..runtime.backends.trt import query_gpu
    if query_gpu() is None:
        return None, None
    try:
        rt = compat.runtime(t, log)
        if compat.engine_validity(t, rt, plan) is not None:
            return None, None
        engine = compat.deserialize(t, rt, plan)
        if engine is None:
            return None, None
        return compat.engine_io(t, engine), layers.inspector_report(compat.inspector_json(t, engine))
    except Exception as e:                                   # report what we can; the plan itself is fine
        _log(f"note: could not inspect the engine on this GPU ({e})", quiet)
        return None, None


def _write_plan(path: Path, plan) -> int:
    view = memoryview(plan)
    with open(path, "wb") as f:
        f.write(view)
    return view.nbytes


def build_engines(bundle_path, precision: str, *, max_seq: int | None = None, max_batch: int | None = None,
                  opt_seq: int = 512, trt: str = "auto", timing_cache: str | Path | None = None,
                  workspace: str | int | None = None, compute_capability: list[str] | None = None,
                  opt_level: int | None = None, quiet: bool = False, verbose: bool = False) -> dict:
    """Build BUNDLE/engines/ and return the engines.json record."""
    bundle = Bundle.load(bundle_path)
    max_seq, max_batch = check_request(bundle, precision, max_seq, max_batch)
    opt_seq = min(int(opt_seq), max_seq)
    try:
        plan_profiles = profiles.plan_profiles(max_seq, max_batch, opt_seq)
    except ValueError as e:
        raise EngineError(str(e)) from None
    workspace = parse_size(workspace)
    if opt_level is not None and not 0 <= int(opt_level) <= 5:
        raise EngineError(f"--opt-level must be between 0 and 5 (got {opt_level})")
    t = compat.load(trt)
    ccs, target = _target(t, compute_capability)
    log = compat.logger(t, verbose)
    graph = bundle.manifest["graphs"][GRAPH]
    onnx_path = bundle.graph_path(GRAPH)

    builder, network, config = compat.new_network(t, log)
    parser, problems = compat.parse_onnx(t, network, log, onnx_path)   # keep `parser`: it owns the weights
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise EngineError(f"{onnx_path.name}: {t.label}'s ONNX parser rejects {problems[0]}{more}")
    if not compat.is_strongly_typed(t, network):
        raise EngineError(f"{t.label} did not create a strongly typed network")
    net_io = compat.network_io(t, network)
    check_network_io(net_io, graph, onnx_path.name)
    report = layers.network_report(compat.network_layers(t, network))
    float_precision = bundle.manifest["dtype"] if precision == record.INT8 else precision
    wrong = layers.precision_problems(report, float_precision)
    if wrong:
        raise EngineError(f"{onnx_path.name} is not a {precision} graph: {wrong[0]}"
                          + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))

    compat.configure(t, config, workspace=workspace, opt_level=opt_level, ccs=ccs)
    for p in plan_profiles:
        bad = profiles.inconsistencies(p)
        if bad:
            raise EngineError(f"internal: inconsistent profile: {bad[0]}")
        compat.add_profile(t, builder, config, p.shapes(graph["inputs"]))

    cache_file, cache = None, None
    if compat.has_timing_cache(t):
        sm = target["compute_capability"].replace(".", "")
        cache_file = Path(timing_cache) if timing_cache else cache_dir() / f"trt-timing-{t.version}-sm{sm}.cache"
        blob = cache_file.read_bytes() if cache_file.exists() else b""
        cache = compat.attach_timing_cache(t, config, blob)
    elif timing_cache:
        _log(f"note: {t.label} has no timing cache (it would need a GPU at build time); ignoring --timing-cache. "
             f"The runtime keeps its compiled kernels in engines/runtime.cache instead.", quiet)

    from .progress import make_monitor
    monitor = make_monitor(compat.progress_base(t), enabled=not quiet)
    if monitor is not None:
        compat.attach_progress(config, monitor)

    where = "any supported GPU" if target["compute_capability"] == "any" else \
        f"{target['gpu']} ({target['compute_capability']})"
    _log(f"building {onnx_path.name} ({precision}) with {t.label} for {where}: profiles "
         + "; ".join(f"{p.name} S {p.dims['seq'][0]}..{p.dims['seq'][2]} P {p.dims['past_seq'][0]}.."
                     f"{p.dims['past_seq'][2]} B 1..{max_batch}" for p in plan_profiles), quiet)
    out = record.engines_dir(bundle)
    tmp = Path(tempfile.mkdtemp(prefix=".engines.partial-", dir=bundle.path))
    try:
        t0 = time.perf_counter()
        try:
            plan = compat.build(t, builder, network, config)
        finally:
            if monitor is not None:
                monitor.close()
        seconds = time.perf_counter() - t0
        if plan is None:
            raise EngineError(f"{t.label} could not build the engine: {compat.last_error(t)}")
        nbytes = _write_plan(tmp / PLAN, plan)
        engine_io, inspected = _inspect_engine(t, log, plan, quiet)
        del plan
        if engine_io:
            check_network_io(engine_io, graph, PLAN)
        if inspected is not None:
            report = inspected
        (tmp / layers.REPORT).write_text(json.dumps(report, indent=1), encoding="utf-8")
        weight_bytes = bundle.manifest["weights"]["bytes"]
        rec = {
            "format": record.FORMAT, "format_version": record.FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tensorrt": {"flavour": t.flavour, "version": t.version, "label": t.label},
            "target": target,
            "precision": precision, "graph_dtype": bundle.manifest["dtype"],
            "quantization": (bundle.manifest.get("quantization") or {}).get("scheme"),
            "max_seq": max_seq, "max_batch": max_batch, "opt_seq": opt_seq,
            "builder_optimization_level": opt_level, "workspace_bytes": workspace,
            "graphs": {onnx_path.name: record.sha256_file(onnx_path)},
            "weights": {"file": bundle.manifest["weights"]["file"], "bytes": weight_bytes},
            "source_sha256": bundle.manifest["source"].get("sha256"),
            "engines": [{"file": PLAN, "graph": GRAPH, "bytes": nbytes,
                         "profiles": [p.to_json(graph["inputs"]) for p in plan_profiles]}],
            "io": {"source": "engine" if engine_io else "network", "tensors": engine_io or net_io},
            "layers": {"file": layers.REPORT, "source": report["source"], "summary": layers.summary(report)},
            "plan_bytes": nbytes, "plan_to_weights": round(nbytes / weight_bytes, 4),
            "build_seconds": round(seconds, 2),
        }
        record.write(tmp, rec)
        atomic.move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if cache is not None:
        _save_timing_cache(cache, cache_file, quiet)
    return rec


def _save_timing_cache(cache, path: Path, quiet: bool) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(bytes(memoryview(cache.serialize())))
        os.replace(tmp, path)
    except OSError as e:
        _log(f"note: could not save the timing cache to {path} ({e.strerror})", quiet)


__all__ = ["build_engines", "EngineError", "BundleError", "PLAN_RULE"]
