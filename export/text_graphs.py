"""Which graphs a bundle holds and how each one is made, for a text model.

`export/bundle.py` asks this object at each step (limits, trace, the I/O of each graph, build, extra
graphs, extra manifest sections); image-token families subclass it (`families/image_export.py`) and
override only what differs, so the bundle writer has no family switch.
"""
from __future__ import annotations

from pathlib import Path

import onnx
import torch

from ..runtime.log import log
from . import ort_graph
from .assemble import ExternalWeights, build_graph
from .checkpoint import Checkpoint
from .contract import describe, graph_io
from .model import Decoder
from .pieces import Piece, trace_pieces
from .errors import ExportError

TARGETS = ("ort", "portable")


class TextGraphs:
    """prefill, decode and score, each assembled from the pieces traced from `decoder` (the portable
    graphs: plain ONNX, what TensorRT builds from and calibration measures), plus with target "ort"
    the ONNX Runtime graph the runtime runs (export/ort_graph.py), reading the same weights."""

    def __init__(self, ckpt: Checkpoint, decoder: type[Decoder], target: str = "ort"):
        if target not in TARGETS:
            raise ExportError(f"unknown --target {target!r} (choose {' or '.join(TARGETS)})")
        self.ckpt, self.spec, self.decoder, self.target = ckpt, ckpt.spec, decoder, target

    def limits(self, max_seq: int, max_batch: int) -> tuple[int, int]:
        """The bundle's max_seq and max_batch, given the ones asked for."""
        return max_seq, max_batch

    def trace(self, dtype: torch.dtype, opset: int, need_score: bool, progress=None) -> dict[str, Piece]:
        return trace_pieces(self.spec, dtype, opset, self.decoder, need_score=need_score, progress=progress)

    def graph_io(self, kind: str, dtype: str) -> dict:
        return graph_io(self.spec, kind, dtype)

    def prologue(self, kind: str) -> str:
        """The piece graph `kind` starts from."""
        return "prologue"

    def build(self, kind: str, pieces: dict[str, Piece], weights: ExternalWeights, io: dict,
              opset: int) -> onnx.ModelProto:
        return build_graph(kind, pieces, self.ckpt, weights, io, opset, prologue=self.prologue(kind))

    def extra_graphs(self, folder: Path, weights: ExternalWeights, dtype: str, opset: int, max_seq: int) -> dict:
        """Graphs beyond prefill/decode/score, written into `folder`: manifest "graphs" entries."""
        if self.target != "ort":
            return {}
        return self.ort_flavor(folder, ort_graph.supports, ort_graph.build_ort_graph, weights, dtype, opset, max_seq)

    def ort_flavor(self, folder: Path, supports, build, weights: ExternalWeights, dtype: str, opset: int,
                   max_seq: int) -> dict:
        """The ONNX Runtime graph `build` makes, written into `folder` (none where `supports` names
        why not): its manifest "graphs" entry."""
        why_not = supports(self.spec)
        if why_not:
            log.info(f"note: no ONNX Runtime graph: {why_not}; the runtime will run the portable graph")
            return {}
        model, io = build(self.ckpt, weights, dtype, max_seq, opset)
        onnx.save_model(model, str(folder / f"{ort_graph.GRAPH}.onnx"))
        return {ort_graph.GRAPH: {"file": f"{ort_graph.GRAPH}.onnx", **describe(io), "flavor": "ort",
                                  "kv_layout": ort_graph.kv_layout(self.spec)}}

    def manifest_sections(self, folder: Path) -> dict:
        """Family sections added to manifest.json (files they name are written into `folder`)."""
        return {}
