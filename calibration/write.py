"""Writing the calibrated bundle: the Q/DQ graphs, one weights.bin holding every tensor once (INT8 or
packed INT4 weights, scales, untouched FP tensors, shared by all graphs, like an exported bundle),
the tokenizer, manifest.json and calibration.json; then a smoke run of every portable graph (and,
with --target trt-rtx, TensorRT-RTX builds). w4a16 bundles also carry the ONNX Runtime graph
(ort_flavor)."""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto

from ..runtime import atomic
from ..runtime.bundle import Bundle, device_numerics, numpy_dtype, write_manifest
from ..runtime.paths import inside
from ..runtime.weights_file import WeightsFile
from . import evaluate as ev
from . import head as qhead
from .graphs import QuantPlan, find_linears, group_inputs, quantize_graph
from .source import SourceModel, SourceWeights

if TYPE_CHECKING:
    from .run_state import CalibrationRun as Calibrator

CALIBRATION_FORMAT = 1


def write_calibrated_bundle(folder: Path, cal: Calibrator, plan: QuantPlan, keep: list[int], t0: float) -> dict:
    """Everything of the new bundle into `folder` (a fresh temporary one); returns its manifest.
    `t0`: when calibration started (for the seconds recorded)."""
    bundle, cfg = cal.bundle, cal.cfg
    extra = ort_flavor(cal)
    with WeightsFile(folder / "weights.bin") as weights:
        write_graphs(folder, cal.source, plan, weights, extra)
    for kind in cal.source.graphs:
        onnx.checker.check_model(str(folder / bundle.manifest["graphs"][kind]["file"]))
    if bundle.manifest.get("tokenizer"):
        _copy_entry(bundle.path, folder, bundle.manifest["tokenizer"], "tokenizer")
    manifest = build_manifest(cal, keep, weights, list(extra))
    _write_manifest(folder, manifest)
    smoke_run(folder, manifest, cfg.threads)
    if cfg.target == "trt-rtx":
        from .trt_check import build_bundle_graphs
        manifest["quantization"]["tensorrt_rtx_build"] = build_bundle_graphs(
            folder, manifest, cfg.compute_capabilities, kinds=("prefill", "decode"), progress=cfg.progress)
    manifest["quantization"]["calibration_seconds"] = round(time.perf_counter() - t0, 1)
    (folder / "calibration.json").write_text(json.dumps(calibration_json(cal, keep, plan), indent=1),
                                             encoding="utf-8")
    _write_manifest(folder, manifest)
    return manifest


def _copy_entry(source: Path, folder: Path, name: str, field: str) -> None:
    """A file the source manifest names, copied to the same name in the new bundle: both ends must lie
    inside their folders (a name like ../notes.txt would overwrite a file beside --out)."""
    what = f"{Path(source) / 'manifest.json'}: {field}"
    shutil.copy2(inside(source, name, what), inside(folder, name, what))


def _write_manifest(folder: Path, manifest: dict) -> None:
    atomic.record_files(folder, manifest)          # what a later --force may replace
    write_manifest(folder, manifest)


def ort_flavor(cal: Calibrator) -> dict[str, onnx.ModelProto]:
    """The FP bundle's ONNX Runtime graph, when the calibrated bundle carries it (kind -> graph): for the
    weight-only schemes (w4a16, w8a16). Its linears get the same DequantizeLinear -> MatMul over the same
    integer tensors as the portable graphs (one copy in weights.bin), which ONNX Runtime rewrites into
    MatMulNBits at load (CPU: 4- and 8-bit; CUDA: seen for 4-bit). Without it a weight-only bundle runs the
    portable graph, which on the GPU copies the KV cache every step (SmolLM2 w8a16 on an H200: 72 tok/s
    against 848 for fp16). w8a8's activation pairs and SmoothQuant folds are placed on the portable
    graphs' patterns only."""
    kind = cal.bundle.ort_graph
    if kind is None or cal.cfg.kind.quantizes_activations:
        return {}
    return {kind: onnx.load(str(cal.bundle.graph_path(kind)), load_external_data=False)}


def write_graphs(folder: Path, source: SourceModel, plan: QuantPlan, weights: WeightsFile,
                 extra: dict[str, onnx.ModelProto] | None = None) -> None:
    """Each graph (the portable ones, and `extra` graphs of the same bundle) with the plan applied,
    its external tensors moved into `weights`."""
    for kind, model in {**source.graphs, **(extra or {})}.items():
        linears = source.linears if kind in source.graphs else find_linears({kind: model})
        q = quantize_graph(model, kind, linears, plan, ev.in_memory_initializer)
        if kind not in source.graphs:
            _quantized_ort_head(q, plan)
        relocate(q, weights, plan.tensors, source.weights, plan.aliases)
        name = source.bundle.manifest["graphs"][kind]["file"]
        ev.save_graph(q, inside(folder, name, f"{source.bundle.path / 'manifest.json'}: graphs.{kind}.file"))
        source.weights.release()


def _quantized_ort_head(model: onnx.ModelProto, plan: QuantPlan) -> None:
    """The ONNX Runtime graph reads a quantized tied head/embedding through its own ops (head.py)."""
    for blocks, table in plan.aliases.items():
        param = table.rsplit(".", 1)[0]
        if any(list(n.output) == [param] and n.op_type == "DequantizeLinear" for n in model.graph.node):
            block = plan.block_size or plan.tensors[blocks].shape[2]      # w8a16: the blocked view's block
            qhead.rewrite_ort_head(model, param, plan.head_bits, block, ev.in_memory_initializer, plan.tensors)


def relocate(model: onnx.ModelProto, weights: WeightsFile, arrays: dict[str, np.ndarray],
             source: SourceWeights, aliases: dict[str, str] | None = None) -> None:
    """Point every external initializer at the new weights file, writing its bytes there once (an
    alias: at the bytes of the tensor it names)."""
    aliases = aliases or {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        base = aliases.get(t.name, t.name)
        data = arrays[base] if info["location"] == ev.IN_MEMORY else source.raw(t)
        off, n = weights.put(base, data)
        del t.external_data[:]
        for k, v in (("location", weights.path.name), ("offset", str(off)), ("length", str(n))):
            t.external_data.add(key=k, value=v)


def smoke_run(out: Path, manifest: dict, threads: int | None) -> dict:
    """Each graph loads and runs in ONNX Runtime on a few tokens (prefill, then decode one more)."""
    ids = np.array([[1, 2, 3, 4]], np.int64) % manifest["spec"]["vocab_size"]
    results = {}
    for kind in manifest["graphs"]:
        if manifest["graphs"][kind].get("flavor") == "ort":
            continue            # other I/O; the runtime's tests run it
        sess = ev.session(out / manifest["graphs"][kind]["file"], threads=threads)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if kind == "decode":
            n_kv, hd = manifest["spec"]["n_kv_heads"], manifest["spec"]["head_dim"]
            past = np.zeros((4, 1, n_kv, hd), numpy_dtype(manifest["kv_dtype"]))
            feeds = {"input_ids": ids[:, :1], "attention_mask": np.ones((1, 5), np.int64)}
            feeds.update({i.name: past for i in sess.get_inputs() if i.name.startswith("past.")})
        logits = sess.run(["logits"], feeds)[0]
        del sess            # one graph's session at a time
        if not np.isfinite(logits).all():
            raise RuntimeError(f"{kind}: quantized graph gives non-finite logits")
        results[kind] = logits
    return results


def build_manifest(cal: Calibrator, keep: list[int], weights: WeightsFile, extra: list[str] = ()) -> dict:
    """The source manifest with the new weights file and a `quantization` section."""
    bundle, cfg = cal.bundle, cal.cfg
    m = json.loads(json.dumps(bundle.manifest))
    m["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    m["weights"] = {"file": weights.path.name, "bytes": weights.offset, "tensors": len(weights.placed)}
    # the portable graphs it quantized, and the ONNX Runtime one for w4a16 (ort_flavor)
    m["graphs"] = {kind: m["graphs"][kind] for kind in [*cal.source.graphs, *extra]}
    wdtype = cfg.kind.weight_dtype
    head_dtype = f"int{qhead.HEAD_BITS}" if cfg.kind.blocked else wdtype     # per block of --block-size
    m["quantization"] = {
        "scheme": cfg.scheme,
        "format": "onnx-qdq",
        "weights": _weights_section(cfg, np.dtype(cal.source.float_np).name),
        "activations": None if not cfg.kind.quantizes_activations else
        {"dtype": "int8", "symmetric": True, "granularity": "per-tensor", "static": True, "method": cfg.method,
         "percentile": cfg.percentile if cfg.method == "percentile" else None,
         "smoothquant_alpha": cfg.smoothquant_alpha,
         # what the runtime asks of ONNX Runtime on x86 (runtime/sessions.py: wants_exact_int8)
         "x86_int8_products": "exact: uint8 x uint8 kernels (session.x64quantprecision), no VPMADDUBSW saturation"
         if m["dtype"] == "fp32" and not cfg.quantize_head else
         "the CPU's own: VPMADDUBSW, saturating, on x86 without VNNI (ONNX Runtime cannot convert this graph's weights)"},
        "quantized_layers": [l for l in cal.source.layers if l not in keep],
        "kept_fp_layers": keep,
        "lm_head": head_dtype if cfg.quantize_head else m["dtype"],
        "embeddings": head_dtype if (cfg.quantize_head and m["spec"].get("tie_word_embeddings")) else m["dtype"],
        "needs": {"int4_weight_only_gemm": True} if wdtype == "int4" else
        {"int8_weight_only_gemm": True, "int8_gemm": cfg.kind.quantizes_activations},
        "calibration": "calibration.json",
        "check": cal.record.check or None,
        "numerics": None,                             # filled below from the section itself
        "source_bundle": _source_summary(bundle),
    }
    m["quantization"]["numerics"] = device_numerics(m)     # what each device computes (runtime/bundle.py)
    return m


def _weights_section(cfg, scale_dtype: str) -> dict:
    if cfg.kind.blocked:
        return {"dtype": "int4", "symmetric": True, "granularity": "per-block", "block_size": cfg.block_size,
                "block_axis": "input", "layout": "onnx-int4 [in, out], two per byte, low nibble first",
                "method": cfg.int4_weights, "scale_dtype": scale_dtype}
    return {"dtype": "int8", "symmetric": True, "granularity": "per-output-channel",
            "method": cfg.weight_method, "scale_dtype": scale_dtype}


def _source_summary(bundle: Bundle) -> dict:
    return {"path": str(Path(bundle.path).resolve()), "created": bundle.manifest.get("created"),
            "dtype": bundle.manifest.get("dtype"), "weights_bytes": bundle.manifest["weights"]["bytes"]}


def weight_scale_summary(plan: QuantPlan) -> dict:
    """Per quantized weight: its scales' range (per output channel, or per block for INT4; the scales
    themselves are in weights.bin)."""
    out = {}
    for param, sname in sorted(plan.weight_scales.items()):
        s = np.asarray(plan.tensors[sname], np.float32)
        out[param] = {"scale": sname, "channels": int(s.size), "min": float(s.min()), "max": float(s.max())}
    return out


def calibration_json(cal: Calibrator, keep: list[int], plan: QuantPlan) -> dict:
    """Everything measured and decided (calibration.json)."""
    cfg, record = cal.cfg, cal.record
    return {
        "format": "ardeploy-calibration", "format_version": CALIBRATION_FORMAT,
        "scheme": cfg.scheme,
        "config": {"method": cfg.method, "percentile": cfg.percentile, "smoothquant_alpha": cfg.smoothquant_alpha,
                   "weight_method": cfg.weights_method, "samples": cfg.samples, "seq_len": cfg.seq_len,
                   "block_size": cfg.block_size if cfg.kind.blocked else None,
                   "quantize_head": cfg.quantize_head, "keep_fp": keep, "keep_fp_requested": cfg.keep_fp,
                   "compute": cal.ops.name},
        "source_bundle": str(Path(cal.bundle.path).resolve()),
        "data": record.data,
        "groups": record.groups,
        "weights": weight_scale_summary(plan),
        "graph_tensors": {kind: group_inputs(cal.source.linears, kind) for kind in cal.source.graphs},
        "check": record.check,
        "sensitivity": record.sensitivity,
        "seconds": record.seconds,
    }
