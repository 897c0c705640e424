"""`ardeploy inspect`: what engines a bundle holds, their profiles, layer precisions and memory.

Reads engines.json and layers.json only; where a GPU can load the engine it also asks TensorRT for
each profile's activation memory.
"""
from __future__ import annotations

import json

from ..runtime import engine_record
from ..runtime import trt_compat as compat
from ..runtime.bundle import Bundle
from ..runtime.cuda import query_gpu
from . import layers as layer_report
from . import record


def _device_memory(bundle: Bundle, rec: dict) -> list[int] | None:
    """Activation bytes of each profile, when this machine's GPU and TensorRT can load the engine."""
    if query_gpu() is None:
        return None
    try:
        tensorrt = compat.load(rec["tensorrt"]["flavour"])
        if tensorrt.version != rec["tensorrt"]["version"]:
            return None
        trt_runtime = compat.runtime(tensorrt, compat.logger(tensorrt))
        plan = (engine_record.engines_dir(bundle) / rec["engines"][0]["file"]).read_bytes()
        if compat.engine_validity(tensorrt, trt_runtime, plan) is not None:
            return None
        engine = compat.deserialize(tensorrt, trt_runtime, plan)
        return None if engine is None else [compat.profile_memory(tensorrt, engine, i)
                                            for i in range(len(rec["engines"][0]["profiles"]))]
    except Exception:
        return None


def inspect_bundle(path, layers: bool = False) -> dict:
    bundle = Bundle.load(path)
    rec = engine_record.load(bundle)
    m = bundle.manifest
    n_kv, hd = bundle.kv_shape
    kv_bytes = 2 * bundle.n_layers * rec["max_seq"] * rec["max_batch"] * n_kv * hd * bundle.kv_dtype.itemsize
    report = json.loads((engine_record.engines_dir(bundle) / rec["layers"]["file"]).read_text(encoding="utf-8"))
    out = {k: rec[k] for k in ("tensorrt", "target", "precision", "max_seq", "max_batch", "opt_seq",
                               "build_seconds", "created")}
    out["engines"] = [{"file": e["file"], "graph": e["graph"], "bytes": e["bytes"],
                       "profiles": [{"name": p["name"], "dims": p["dims"]} for p in e["profiles"]]}
                      for e in rec["engines"]]
    out["memory"] = {"plan_bytes": rec["plan_bytes"], "weight_bytes": m["weights"]["bytes"],
                     "plan_to_weights": rec["plan_to_weights"], "kv_arena_bytes": kv_bytes,
                     "activation_bytes_per_profile": _device_memory(bundle, rec)}
    out["layers"] = {"source": report["source"], "count": len(report["layers"]),
                     "precisions": layer_report.summary(report),
                     "problems": layer_report.precision_problems(report, record.float_precision(rec))}
    if layers:
        out["layers"]["list"] = report["layers"]
    out["io"] = rec["io"]
    return out


def render(rep: dict) -> str:
    mib = lambda n: f"{n / 2**20:.1f} MiB"   # noqa: E731
    target, mem = rep["target"], rep["memory"]
    where = "any supported GPU" if target["compute_capability"] == "any" else \
        f"{target['gpu']} ({target['compute_capability']})"
    lines = [f"engines: {rep['tensorrt']['label']}, {rep['precision']}, for {where}"
             + f", max_seq {rep['max_seq']}, max_batch {rep['max_batch']}, built in {rep['build_seconds']} s"]
    for e in rep["engines"]:
        lines.append(f"  {e['file']} ({mib(e['bytes'])}) from the {e['graph']} graph")
        for p in e["profiles"]:
            lines.append(f"    profile {p['name']:<8} " + "  ".join(f"{k} {v[0]}/{v[1]}/{v[2]}" for k, v in p["dims"].items()))
    lines.append(f"memory: plan {mib(mem['plan_bytes'])} = {mem['plan_to_weights']:.3f} x weights "
                 f"({mib(mem['weight_bytes'])}); KV arena {mib(mem['kv_arena_bytes'])}"
                 + ("" if mem["activation_bytes_per_profile"] is None else
                    "; activations " + ", ".join(mib(x) for x in mem["activation_bytes_per_profile"])))
    lay = rep["layers"]
    lines.append(f"layers ({lay['count']}, from the {'engine inspector' if lay['source'] == 'engine_inspector' else 'strongly typed network'}):")
    for kind, counts in lay["precisions"].items():
        lines.append(f"  {kind:<20} " + ", ".join(f"{dt} {n}" for dt, n in sorted(counts.items())))
    for p in lay["problems"][:5]:
        lines.append(f"  precision problem: {p}")
    for layer in lay.get("list", []):
        lines.append(f"    {layer['name']:<48} {layer['type']:<18} {', '.join(layer['outputs'])}")
    return "\n".join(lines)
