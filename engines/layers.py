"""The layer report saved beside the engines (layers.json), and the precision rule it must meet.

With a GPU, the report is TensorRT's IEngineInspector output (JSON, one entry per fused layer).
Without one (a CPU-only TensorRT-RTX build) an engine cannot be deserialized, so there is no
inspector; the report then lists the strongly typed network's layers with the types of their
outputs. Strong typing makes those the engine's precisions: the builder may fuse layers and pick
kernels but may not change any tensor's type.
"""
from __future__ import annotations

import json
from collections import Counter

from .record import PRECISIONS

REPORT = "layers.json"
_FLOATS = ("float32", "float16", "bfloat16")


def network_report(layers: list[dict]) -> dict:
    return {"source": "network", "note": "strongly typed network: output types are the engine's precisions "
            "(no GPU at build time, so no IEngineInspector report)", "layers": layers}


def _inspector_dtype(text: str) -> str | None:
    upper = text.upper()
    for key, name in (("BF16", "bfloat16"), ("FP16", "float16"), ("HALF", "float16"), ("FP32", "float32"),
                      ("FLOAT", "float32"), ("INT64", "int64"), ("INT32", "int32"), ("INT8", "int8"),
                      ("BOOL", "bool")):
        if key in upper:
            return name
    return None


def inspector_report(info_json: str) -> dict:
    """IEngineInspector's JSON, with each layer's output types pulled out into our own form too."""
    info = json.loads(info_json)
    layers = []
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):           # LAYER_NAMES_ONLY verbosity gives plain names
            continue
        outs = [_inspector_dtype(str(o.get("Format/Datatype", ""))) for o in layer.get("Outputs", [])]
        layers.append({"name": layer.get("Name", ""), "type": layer.get("LayerType", ""),
                       "outputs": [o for o in outs if o]})
    return {"source": "engine_inspector", "layers": layers, "inspector": info}


def summary(report: dict) -> dict[str, dict[str, int]]:
    """Layer type -> {output dtype: count}."""
    out: dict[str, Counter] = {}
    for layer in report["layers"]:
        for dt in layer["outputs"] or ["-"]:
            out.setdefault(layer["type"], Counter())[dt] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def precision_problems(report: dict, precision: str) -> list[str]:
    """Layers whose types contradict the precision asked for.

    fp16/bf16: every matrix multiply runs in that type and no other 16-bit float appears (norms,
    softmax and the logits stay float32 by design). fp32: no 16-bit float anywhere.
    """
    want = PRECISIONS[precision]
    problems = []
    for layer in report["layers"]:
        outs = set(layer["outputs"])
        halves = outs & {"float16", "bfloat16"}
        if want == "float32" and halves:
            problems.append(f"{layer['name']} ({layer['type']}) outputs {', '.join(sorted(halves))}")
        elif want != "float32":
            if halves - {want}:
                problems.append(f"{layer['name']} ({layer['type']}) outputs {', '.join(sorted(halves - {want}))}")
            if "MATRIXMULTIPLY" in str(layer["type"]).upper().replace("_", "") and outs & set(_FLOATS) and want not in outs:
                problems.append(f"{layer['name']} ({layer['type']}) runs in {', '.join(sorted(outs))}")
    return problems
