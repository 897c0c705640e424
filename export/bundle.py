"""`ardeploy export`: checkpoint -> bundle folder (graphs, shared weights, tokenizer, manifest.json).

The bundle is written into a temporary folder beside the target and renamed into place at the end,
so a failure never leaves a half-written bundle behind.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import sys
import time
from pathlib import Path

import onnx
import torch

from ..runtime import atomic
from .assemble import WeightsFile, build_graph
from .checkpoint import Checkpoint
from .errors import CheckpointError, ExportError
from .contract import describe, graph_io, value_infos

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAPH_KINDS = ("decode", "prefill", "score")     # decode first: it decides how shared weights are laid out
DEFAULT_OPSET = 21
BUNDLE_FORMAT_VERSION = 1


def toolkit_version() -> str:
    try:
        from importlib.metadata import version
        return version("ardeploy")
    except Exception:
        return "0+unknown"


def check_out(out: Path, force: bool) -> None:
    """Refuse an output we cannot or must not write, before any work is done."""
    atomic.check_out(out, force, ExportError)


def _prepare_out(out: Path, force: bool) -> Path:
    """Return the temporary folder to build in, beside the target."""
    check_out(out, force)
    return atomic.temp_beside(out, ExportError)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def export_bundle(ckpt: Checkpoint, out: str | Path, dtype: str = "fp32", max_seq: int = 2048, max_batch: int = 1,
                  opset: int = DEFAULT_OPSET, force: bool = False, quiet: bool = False, score_graph: bool = True) -> dict:
    """Write the bundle and return its manifest."""
    from tqdm import tqdm

    from .pieces import trace_pieces

    if dtype not in TORCH_DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r} (choose fp32, fp16 or bf16)")
    if max_seq < 2:
        raise ExportError(f"--max-seq must be at least 2 (got {max_seq})")
    if max_batch < 1:
        raise ExportError(f"--max-batch must be at least 1 (got {max_batch})")
    out = Path(out)
    spec = ckpt.spec
    from .families.image_export import image_plan
    plan = image_plan(ckpt)                     # None for text models
    if plan:
        max_seq, max_batch = plan.limits(max_seq, max_batch)
    if max_seq > spec.max_position_embeddings:
        _log(f"note: --max-seq {max_seq} exceeds the model's trained context ({spec.max_position_embeddings})", quiet)
    tmp = _prepare_out(out, force)
    t0 = time.perf_counter()
    try:
        kinds = GRAPH_KINDS if score_graph else GRAPH_KINDS[:2]
        with tqdm(total=5 if score_graph else 4, desc="trace", unit="piece", disable=quiet, leave=False) as bar:
            pieces = trace_pieces(spec, TORCH_DTYPES[dtype], opset, need_score=score_graph,
                                  progress=lambda name: (bar.set_postfix_str(name), bar.update(0)))
            if plan:
                pieces.update(plan.extra_pieces(TORCH_DTYPES[dtype], opset))
            bar.update(bar.total)
        weights = WeightsFile(tmp / "weights.bin", TORCH_DTYPES[dtype])
        graphs = {}
        try:
            for kind in tqdm(kinds, desc="assemble", unit="graph", disable=quiet, leave=False):
                io = plan.graph_io(kind, dtype) if plan else graph_io(spec, kind, dtype)
                model = plan.build_graph(kind, pieces, weights, value_infos(io), opset) if plan else None
                if model is None:
                    model = build_graph(kind, pieces, ckpt, weights, value_infos(io), opset)
                path = tmp / f"{kind}.onnx"
                onnx.save_model(model, str(path))
                graphs[kind] = {"file": path.name, **describe(io)}
            if plan:   # the VQ decoder graph; its weights go into the same shared file
                graphs.update(plan.write_extra_graphs(tmp, weights, TORCH_DTYPES[dtype], opset))
        finally:
            weights.close()
        for g in graphs.values():
            onnx.checker.check_model(str(tmp / g["file"]))   # by path, so external data is checked too
        tokenizer_file = None
        if ckpt.tokenizer_json:
            (tmp / "tokenizer.json").write_text(ckpt.tokenizer_json, encoding="utf-8")
            tokenizer_file = "tokenizer.json"
        manifest = {
            "format": "ardeploy-bundle",
            "format_version": BUNDLE_FORMAT_VERSION,
            "toolkit_version": toolkit_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(Path(ckpt.source).resolve()), "format": ckpt.source_format,
                       "files": [p.name for p in ckpt.source_files], "sha256": ckpt.source_sha256()},
            "family": ckpt.family,
            "spec": spec.to_dict(),
            "dtype": dtype,
            "kv_dtype": {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype],
            "logits_dtype": "float32",
            "max_seq": max_seq,
            "max_batch": max_batch,
            "kv_layout": {"order": ["time", "batch", "kv_head", "head_dim"],
                          "shape": ["max_seq", "batch", spec.n_kv_heads, spec.head_dim]},
            "opset": opset,
            "weights": {"file": "weights.bin", "bytes": weights.offset, "tensors": len(weights.stored)},
            "graphs": graphs,
            "tokenizer": tokenizer_file,
            "special_tokens": ckpt.special_tokens,
            "chat_template": ckpt.chat_template,
            "generation_defaults": ckpt.generation_defaults,
            "export_seconds": round(time.perf_counter() - t0, 2),
        }
        if plan:
            manifest["image"] = plan.manifest_section(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        atomic.move_into_place(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_path(path: str | Path, out: str | Path, family: str | None = None, family_options: dict | None = None,
                **kw) -> dict:
    from .loaders import load_checkpoint
    check_out(Path(out), kw.get("force", False))
    ckpt = load_checkpoint(path, family=family, **(family_options or {}))
    for w in ckpt.warnings:
        _log(f"warning: {w}", kw.get("quiet", False))
    return export_bundle(ckpt, out, **kw)


__all__ = ["export_bundle", "export_path", "ExportError", "CheckpointError"]
