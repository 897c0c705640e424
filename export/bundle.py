"""`ardeploy export`: checkpoint -> bundle folder (graphs, shared weights, tokenizer, manifest.json).

The bundle is written into a temporary folder beside the target and renamed into place at the end,
so a failure never leaves a half-written bundle behind.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path

import onnx
import torch

from ..runtime import atomic
from ..runtime.bundle import FORMAT, FORMAT_VERSION, write_manifest
from ..runtime.errors import UserError
from ..runtime.log import log, progress_enabled
from ..runtime.manifest_checks import BOUNDS
from .assemble import ExternalWeights
from .checkpoint import Checkpoint
from .contract import describe, value_infos
from .errors import CheckpointError, ExportError
from .registry import family_of, load_checkpoint
from .text_graphs import TextGraphs

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GRAPH_KINDS = ("decode", "prefill", "score")     # decode first: it decides how shared weights are laid out
DEFAULT_OPSET = 21
MIN_OPSET = 18                  # the oldest opset torch.onnx's dynamo exporter writes


def toolkit_version() -> str:
    try:
        from importlib.metadata import version
        return version("ardeploy")
    except Exception:
        return "0+unknown"


def check_out(out: Path, force: bool) -> bool:
    """Refuse an output we cannot or must not write, before any work is done; True: out is replaced."""
    return atomic.check_out(out, force, ExportError)


def export_bundle(ckpt: Checkpoint, out: str | Path, dtype: str = "fp32", max_seq: int = 2048, max_batch: int = 1,
                  opset: int = DEFAULT_OPSET, force: bool = False, quiet: bool = False, score_graph: bool = True,
                  target: str = "ort") -> dict:
    """Write the bundle and return its manifest. target "ort" adds the ONNX Runtime graph the runtime
    runs to the portable graphs (which TensorRT builds from); "portable" writes those only."""
    _check_options(dtype, max_seq, max_batch, opset)
    out = Path(out)
    try:
        graphs = family_of(ckpt).graphs(ckpt, target)
    except UserError as e:
        raise ExportError(str(e)) from None
    max_seq, max_batch = graphs.limits(max_seq, max_batch)
    if max_seq > ckpt.spec.max_position_embeddings and not quiet:
        log.info(f"note: --max-seq {max_seq} exceeds the model's trained context ({ckpt.spec.max_position_embeddings})")
    replace = check_out(out, force)
    started = time.perf_counter()
    with atomic.folder_written_whole(out, ExportError, replace=replace) as folder:
        pieces = _trace(graphs, TORCH_DTYPES[dtype], opset, score_graph, quiet)
        kinds = GRAPH_KINDS if score_graph else GRAPH_KINDS[:2]
        graph_entries, weights_entry = _write_graphs(graphs, pieces, kinds, folder, dtype, opset, max_seq, quiet)
        for entry in graph_entries.values():
            # by path, so external data is checked too; the ONNX Runtime graph uses ONNX Runtime's own
            # SimplifiedLayerNormalization, which onnx's checker does not know (the runtime loads it)
            if entry.get("flavor") != "ort":
                onnx.checker.check_model(str(folder / entry["file"]))
        manifest = _manifest(ckpt, dtype, max_seq, max_batch, opset, weights_entry, graph_entries,
                             _write_tokenizer(ckpt, folder))
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        manifest.update(graphs.manifest_sections(folder))
        atomic.record_files(folder, manifest)          # what a later --force may replace
        write_manifest(folder, manifest)
    return manifest


def _check_options(dtype: str, max_seq: int, max_batch: int, opset: int = DEFAULT_OPSET) -> None:
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ExportError(f"--opset {opset} is not supported (choose {MIN_OPSET} to {onnx.defs.onnx_opset_version()})")
    if dtype not in TORCH_DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r} (choose fp32, fp16 or bf16)")
    if not 2 <= max_seq <= BOUNDS["max_seq"]:
        raise ExportError(f"--max-seq must be in [2, {BOUNDS['max_seq']}] (got {max_seq})")
    if not 1 <= max_batch <= BOUNDS["max_batch"]:
        raise ExportError(f"--max-batch must be in [1, {BOUNDS['max_batch']}] (got {max_batch})")


def _trace(graphs: TextGraphs, dtype: torch.dtype, opset: int, score_graph: bool, quiet: bool) -> dict:
    from tqdm import tqdm
    with tqdm(total=5 if score_graph else 4, desc="trace", unit="piece", disable=quiet or not progress_enabled(),
              leave=False) as bar:
        pieces = graphs.trace(dtype, opset, score_graph, progress=lambda name: (bar.set_postfix_str(name), bar.update(0)))
        bar.update(bar.total)
    return pieces


def _write_graphs(graphs: TextGraphs, pieces: dict, kinds: tuple[str, ...], folder: Path, dtype: str, opset: int,
                  max_seq: int, quiet: bool) -> tuple[dict, dict]:
    """Each graph into `folder` and every weight once into weights.bin; their manifest entries."""
    from tqdm import tqdm
    weights = ExternalWeights(folder / "weights.bin", TORCH_DTYPES[dtype])
    entries = {}
    try:
        for kind in tqdm(kinds, desc="assemble", unit="graph", disable=quiet or not progress_enabled(), leave=False):
            io = graphs.graph_io(kind, dtype)
            model = graphs.build(kind, pieces, weights, value_infos(io), opset)
            onnx.save_model(model, str(folder / f"{kind}.onnx"))
            entries[kind] = {"file": f"{kind}.onnx", **describe(io)}
        # The ONNX Runtime graph, or an image family's VQ decoder: their weights go into the same file.
        entries.update(graphs.extra_graphs(folder, weights, dtype, opset, max_seq))
    finally:
        weights.close()
    return entries, {"file": "weights.bin", "bytes": weights.offset, "tensors": len(weights.stored)}


def _write_tokenizer(ckpt: Checkpoint, folder: Path) -> str | None:
    if not ckpt.tokenizer_json:
        return None
    (folder / "tokenizer.json").write_text(ckpt.tokenizer_json, encoding="utf-8")
    return "tokenizer.json"


def _manifest(ckpt: Checkpoint, dtype: str, max_seq: int, max_batch: int, opset: int, weights_entry: dict,
              graph_entries: dict, tokenizer_file: str | None) -> dict:
    """manifest.json's fields (docs/ARCHITECTURE.md, "Bundle format"); export_seconds comes last."""
    spec = ckpt.spec
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
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
        "weights": weights_entry,
        "graphs": graph_entries,
        "tokenizer": tokenizer_file,
        "special_tokens": ckpt.special_tokens,
        "chat_template": ckpt.chat_template,
        "generation_defaults": ckpt.generation_defaults,
    }


def export_path(path: str | Path, out: str | Path, family: str | None = None, family_options: dict | None = None,
                **kw) -> dict:
    check_out(Path(out), kw.get("force", False))
    ckpt = load_checkpoint(path, family=family, **(family_options or {}))
    if not kw.get("quiet", False):
        for warning in ckpt.warnings:
            log.warning(f"warning: {warning}")
    return export_bundle(ckpt, out, **kw)


__all__ = ["export_bundle", "export_path", "ExportError", "CheckpointError"]
