"""Writing the calibrated bundle: the Q/DQ graphs, one weights.bin holding every tensor once (INT8
weights, scales, untouched FP tensors, shared by all graphs, like an exported bundle), the
tokenizer, manifest.json and calibration.json; then a smoke run of every graph (and, with
--target trt-rtx, TensorRT-RTX builds)."""
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

from ..runtime.bundle import Bundle, numpy_dtype
from ..runtime.weights_file import WeightsFile
from . import evaluate as ev
from .graphs import QuantPlan, group_inputs, quantize_graph
from .source import SourceModel, SourceWeights

if TYPE_CHECKING:
    from .quantize import Calibrator

CALIBRATION_FORMAT = 1


def write_calibrated_bundle(folder: Path, cal: Calibrator, plan: QuantPlan, keep: list[int], t0: float) -> dict:
    """Everything of the new bundle into `folder` (a fresh temporary one); returns its manifest.
    `t0`: when calibration started (for the seconds recorded)."""
    bundle, cfg = cal.bundle, cal.cfg
    with WeightsFile(folder / "weights.bin") as weights:
        write_graphs(folder, cal.source, plan, weights)
    for kind in cal.source.graphs:
        onnx.checker.check_model(str(folder / bundle.manifest["graphs"][kind]["file"]))
    if bundle.manifest.get("tokenizer"):
        shutil.copy2(bundle.path / bundle.manifest["tokenizer"], folder / bundle.manifest["tokenizer"])
    manifest = build_manifest(cal, keep, weights)
    _write_manifest(folder, manifest)
    smoke_run(folder, manifest, cfg.threads)
    if cfg.target == "trt-rtx":
        from .trt_check import build_bundle_graphs
        manifest["quantization"]["tensorrt_rtx_build"] = build_bundle_graphs(
            folder, manifest, cfg.compute_capabilities, kinds=("prefill", "decode"), progress=cfg.progress)
    manifest["quantization"]["calibration_seconds"] = round(time.perf_counter() - t0, 1)
    _write_manifest(folder, manifest)
    (folder / "calibration.json").write_text(json.dumps(calibration_json(cal, keep, plan), indent=1),
                                             encoding="utf-8")
    return manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")


def write_graphs(folder: Path, source: SourceModel, plan: QuantPlan, weights: WeightsFile) -> None:
    """Each graph with the plan applied, its external tensors moved into `weights`."""
    for kind, model in source.graphs.items():
        q = quantize_graph(model, kind, source.linears, plan, ev.in_memory_initializer)
        relocate(q, weights, plan.tensors, source.weights)
        onnx.save_model(q, str(folder / source.bundle.manifest["graphs"][kind]["file"]))


def relocate(model: onnx.ModelProto, weights: WeightsFile, arrays: dict[str, np.ndarray],
             source: SourceWeights) -> None:
    """Point every external initializer at the new weights file, writing its bytes there once."""
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        data = arrays[t.name] if info["location"] == ev.IN_MEMORY else source.raw(t)
        off, n = weights.put(t.name, data)
        del t.external_data[:]
        for k, v in (("location", weights.path.name), ("offset", str(off)), ("length", str(n))):
            t.external_data.add(key=k, value=v)


def smoke_run(out: Path, manifest: dict, threads: int | None) -> dict:
    """Each graph loads and runs in ONNX Runtime on a few tokens (prefill, then decode one more)."""
    ids = np.array([[1, 2, 3, 4]], np.int64) % manifest["spec"]["vocab_size"]
    results = {}
    for kind in manifest["graphs"]:
        sess = ev.session(out / manifest["graphs"][kind]["file"], threads=threads)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if kind == "decode":
            n_kv, hd = manifest["spec"]["n_kv_heads"], manifest["spec"]["head_dim"]
            past = np.zeros((4, 1, n_kv, hd), numpy_dtype(manifest["kv_dtype"]))
            feeds = {"input_ids": ids[:, :1], "attention_mask": np.ones((1, 5), np.int64)}
            feeds.update({i.name: past for i in sess.get_inputs() if i.name.startswith("past.")})
        logits = sess.run(["logits"], feeds)[0]
        if not np.isfinite(logits).all():
            raise RuntimeError(f"{kind}: quantized graph gives non-finite logits")
        results[kind] = logits
    return results


def build_manifest(cal: Calibrator, keep: list[int], weights: WeightsFile) -> dict:
    """The source manifest with the new weights file and a `quantization` section."""
    bundle, cfg = cal.bundle, cal.cfg
    m = json.loads(json.dumps(bundle.manifest))
    m["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    m["weights"] = {"file": weights.path.name, "bytes": weights.offset, "tensors": len(weights.placed)}
    m["graphs"] = {kind: m["graphs"][kind] for kind in cal.source.graphs}       # the portable ones it quantized
    m["quantization"] = {
        "scheme": cfg.scheme,
        "format": "onnx-qdq",
        "weights": {"dtype": "int8", "symmetric": True, "granularity": "per-output-channel",
                    "method": cfg.weight_method, "scale_dtype": np.dtype(cal.source.float_np).name},
        "activations": None if cfg.scheme == "w8a16" else
        {"dtype": "int8", "symmetric": True, "granularity": "per-tensor", "static": True, "method": cfg.method,
         "percentile": cfg.percentile if cfg.method == "percentile" else None,
         "smoothquant_alpha": cfg.smoothquant_alpha},
        "quantized_layers": [l for l in cal.source.layers if l not in keep],
        "kept_fp_layers": keep,
        "lm_head": "int8" if cfg.quantize_head else m["dtype"],
        "embeddings": "int8" if (cfg.quantize_head and m["spec"].get("tie_word_embeddings")) else m["dtype"],
        "needs": {"int8_weight_only_gemm": True, "int8_gemm": cfg.scheme == "w8a8"},
        "calibration": "calibration.json",
        "check": cal.record.check or None,
        "source_bundle": _source_summary(bundle),
    }
    return m


def _source_summary(bundle: Bundle) -> dict:
    return {"path": str(Path(bundle.path).resolve()), "created": bundle.manifest.get("created"),
            "dtype": bundle.manifest.get("dtype"), "weights_bytes": bundle.manifest["weights"]["bytes"]}


def weight_scale_summary(plan: QuantPlan) -> dict:
    """Per quantized weight: its per-output-channel scale range (the scales themselves are in weights.bin)."""
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
                   "weight_method": cfg.weight_method, "samples": cfg.samples, "seq_len": cfg.seq_len,
                   "quantize_head": cfg.quantize_head, "keep_fp": keep, "keep_fp_requested": cfg.keep_fp},
        "source_bundle": str(Path(cal.bundle.path).resolve()),
        "data": record.data,
        "groups": record.groups,
        "weights": weight_scale_summary(plan),
        "graph_tensors": {kind: group_inputs(cal.source.linears, kind) for kind in cal.source.graphs},
        "check": record.check,
        "sensitivity": record.sensitivity,
        "seconds": record.seconds,
    }
