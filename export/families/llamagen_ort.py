"""The ONNX Runtime flavor of LlamaGen's decode graph (class-conditional, c2i): export/ort_graph.py's
text graph with one difference, the rotary tables.

What LlamaGen changes and how each maps onto the text graph (export/ort_graph.py):

* Prefix. The class token is an input id: class c is `V + c` in the embedding table (the class table
  sits below the code embeddings, families/llamagen.py), so `input_ids` / `Gather` are unchanged.
  Every c2i row holds exactly one prefix token, so a guided batch (cond rows, then null-class rows)
  has no padding and each row's cache positions are its sequence positions.
* 2D RoPE. GroupQueryAttention rotates the token at cache position p by row p of its cos/sin tables
  (a prompt from 0, a decode step at `seqlens_k`), which is LlamaGen's `freqs_cis[input_pos]`: the
  tables are LlamaGen's 2D table, zero rows for the prefix (q = k = 0 there, not the identity) and
  grid cell (row, column) angles after it. LlamaGen rotates interleaved pairs; our q/k weight rows
  are already permuted per head onto the half-split layout (the portable graphs read the same
  tensors), so the operator rotates half-split pairs (`rotary_interleaved=0`), exactly equivalent.
* Head. Untied, over the V codes only (the class rows of the embedding are never predicted): the
  text graph's untied head as it is.

t2i is not expressed: its caption prefix is left-padded inside the prefix (LlamaGen masks the padded
caption keys for every later query), a mask GroupQueryAttention cannot take; t2i bundles keep the
portable graphs.
"""
from __future__ import annotations

import torch

from .. import ort_graph
from ..assemble import ExternalWeights
from ..checkpoint import Checkpoint
from ..contract import value_infos
from ..spec import ModelSpec
from .llamagen import GridRotary

GRAPH = ort_graph.GRAPH


def supports(spec: ModelSpec) -> str | None:
    """Why this model gets no ONNX Runtime graph (None when it does)."""
    cfg = spec.extra.get("llamagen") or {}
    if cfg.get("model_type") != "c2i":
        return "LlamaGen t2i's padded caption prefix needs a mask GroupQueryAttention does not take"
    return ort_graph.supports(spec)


class LlamaGenOrtGraph(ort_graph.OrtGraph):
    """The text graph with LlamaGen's 2D rotary tables (see the module docstring)."""

    ROTARY_NAMES = ("rotary.grid.cos", "rotary.grid.sin")

    def rotary_cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row p is sequence position p, from the portable graph's GridRotary (the same float32
        arithmetic, so both flavors rotate by the same values)."""
        half = self.spec.head_dim // 2
        cos, sin = GridRotary(self.spec)(torch.arange(self.max_seq), torch.float32)
        return cos[:, :half], sin[:, :half]


def build_llamagen_ort_graph(ckpt: Checkpoint, weights: ExternalWeights, dtype: str, max_seq: int, opset: int):
    """(decode_ort ModelProto, its contract I/O) for a LlamaGen c2i checkpoint."""
    io = ort_graph.graph_io(ckpt.spec, dtype)
    return LlamaGenOrtGraph(ckpt, weights, max_seq).build(value_infos(io), opset), io
