"""What an image-token family changes in a bundle export: `ImageGraphs`, the text graphs plus these,
one class per family overriding only what differs (registry.py names each family's class).

* limits: LlamaGen's 2D rotary table has prefix + grid^2 rows, so max_seq is exactly that; every image
  family gets max_batch >= 2 (a conditional and an unconditional row for classifier-free guidance).
* LlamaGen t2i: the prefill graph starts from caption features instead of token ids (one extra traced
  prologue piece, the blocks and head are the usual ones).
* with target "ort", the ONNX Runtime graph `decode_ort.onnx`, which the runtime runs: Emu3 and Emu3.5
  take the text graph as it is (their language models are Llama and Qwen3); LlamaGen c2i the text graph
  with LlamaGen's 2D rotary as GroupQueryAttention's cos/sin tables (families/llamagen_ort.py); LlamaGen
  t2i keeps the portable graphs (its padded caption prefix needs a mask GroupQueryAttention lacks).
* the VQ decoder graph `vq_decoder.onnx`: `tokens` int64 [batch, height, width] -> `pixels` float32
  [batch, 3, height*f, width*f]; its weights are appended to the shared weights file.
* manifest.json's "image" section and arrays the runtime needs (LlamaGen t2i's null caption).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto
from torch import nn

from ...runtime.bundle import image_condition
from .. import ort_graph
from ..assemble import ONNX_DTYPE, ExternalWeights
from ..contract import describe, graph_io
from ..pieces import Piece, export_program, to_piece, trace_model
from ..text_graphs import TextGraphs
from .vq import build_vq_module

MIN_EXTERNAL = 1024     # initializers with at least this many elements go to the shared weights file


class _CaptionPrologue(nn.Module):
    def __init__(self, dec):
        super().__init__()
        self.dec = dec

    def forward(self, caption_features, attention_mask):
        x, cos, sin, mask = self.dec.prologue_caption(caption_features, attention_mask)
        return (x, *self.dec.block_inputs(cos, sin, mask))     # shaped as the traced block expects


class ImageGraphs(TextGraphs):
    """The text graphs, plus what every image family adds (see the module docstring): room for guidance,
    the VQ decoder graph and the manifest's "image" section. Families override only what differs
    (LlamaGenGraphs, LlamaGenC2IGraphs, LlamaGenT2IGraphs below; Emu3 and Emu3.5 use this class as is)."""

    def limits(self, max_seq: int, max_batch: int) -> tuple[int, int]:
        return max_seq, max(max_batch, 2)          # a conditional and an unconditional row

    def extra_graphs(self, folder, weights: ExternalWeights, dtype: str, opset: int, max_seq: int) -> dict:
        entries = self.ort_image_graph(folder, weights, dtype, opset, max_seq) if self.target == "ort" else {}
        vq = self.ckpt.vq
        if vq is None:
            return entries
        model, io = export_vq_graph(vq, weights.dtype, opset, weights)
        onnx.save_model(model, str(folder / "vq_decoder.onnx"))
        return {**entries, "vq_decoder": {"file": "vq_decoder.onnx", **io}}

    def ort_image_graph(self, folder, weights: ExternalWeights, dtype: str, opset: int, max_seq: int) -> dict:
        """The family's ONNX Runtime graph: the text model's (Emu3, Emu3.5)."""
        return self.ort_flavor(folder, ort_graph.supports, ort_graph.build_ort_graph, weights, dtype, opset, max_seq)

    def manifest_sections(self, folder) -> dict:
        image = dict(self.ckpt.image)
        image["condition"] = image_condition(image)          # format version 2 states it
        for name, tensor in self.ckpt.arrays.items():
            np.save(folder / f"{name}.npy", tensor.load().detach().cpu().numpy())
        if self.ckpt.vq is not None:
            vq = self.ckpt.vq
            image["vq"] = {"graph": "vq_decoder", "kind": vq.kind, "downsample": vq.downsample,
                           "codebook_size": vq.config["codebook_size"], "config": vq.config}
        return {"image": image}


class LlamaGenGraphs(ImageGraphs):
    """LlamaGen: the 2D rotary table has prefix + grid^2 rows, so max_seq is exactly that."""

    def limits(self, max_seq: int, max_batch: int) -> tuple[int, int]:
        cfg = self.spec.extra["llamagen"]
        return super().limits(cfg["cls_token_num"] + cfg["grid"] ** 2, max_batch)

    def ort_image_graph(self, folder, weights: ExternalWeights, dtype: str, opset: int, max_seq: int) -> dict:
        """None here (t2i: the portable graphs run); c2i overrides."""
        return {}


class LlamaGenC2IGraphs(LlamaGenGraphs):
    """Class-conditional LlamaGen: also the ONNX Runtime graph (families/llamagen_ort.py), which the
    runtime runs."""

    def ort_image_graph(self, folder, weights: ExternalWeights, dtype: str, opset: int, max_seq: int) -> dict:
        from . import llamagen_ort
        return self.ort_flavor(folder, llamagen_ort.supports, llamagen_ort.build_llamagen_ort_graph, weights,
                               dtype, opset, max_seq)


class LlamaGenT2IGraphs(LlamaGenGraphs):
    """Caption-conditional LlamaGen: the prefill graph starts from caption features instead of token ids
    (one extra traced prologue piece; the blocks and head are the usual ones)."""

    def trace(self, dtype: torch.dtype, opset: int, need_score: bool, progress=None) -> dict[str, Piece]:
        pieces = super().trace(dtype, opset, need_score, progress)
        pieces["prologue_caption"] = self._trace_caption_prologue(dtype, opset)
        return pieces

    def _trace_caption_prologue(self, dtype: torch.dtype, opset: int) -> Piece:
        from torch.export import Dim
        dec = trace_model(self.spec, dtype, self.decoder)
        batch, seq = Dim("batch", min=1, max=1 << 14), Dim("seq", min=1, max=1 << 20)
        feats = torch.randn(2, 3, self.spec.extra["llamagen"]["caption_dim"])
        mask = torch.ones(2, 3, dtype=torch.int64)
        program = export_program(_CaptionPrologue(dec), (feats, mask), ["caption_features", "attention_mask"],
                                 ["io_x", "io_cos", "io_sin", "io_mask"],
                                 {"caption_features": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}, opset)
        return to_piece(program, dict(dec.named_parameters()))

    def graph_io(self, kind: str, dtype: str) -> dict:
        io = graph_io(self.spec, kind, dtype)
        if kind == "prefill":
            dim = self.spec.extra["llamagen"]["caption_dim"]
            io["inputs"] = [("caption_features", TensorProto.FLOAT, ["batch", "seq", dim]),
                            ("attention_mask", TensorProto.INT64, ["batch", "seq"])]
        return io

    def prologue(self, kind: str) -> str:
        return "prologue_caption" if kind == "prefill" else "prologue"


def export_vq_graph(vq, dtype: torch.dtype, opset: int, weights: ExternalWeights | None = None):
    """Trace the VQ decoder with dynamic batch/height/width. With `weights`, its large initializers
    are appended to that shared file (and referenced as external data); otherwise they stay inline."""
    from torch.export import Dim
    module = build_vq_module(vq, dtype)
    codes = torch.randint(0, vq.config["codebook_size"], (2, 3, 5))       # sizes >= 2 stay symbolic
    dims = {0: Dim("batch", min=1, max=1 << 10), 1: Dim("height", min=1, max=1 << 12), 2: Dim("width", min=1, max=1 << 12)}
    with torch.no_grad():
        program = export_program(module, (codes,), ["tokens"], ["pixels"], {"codes": dims}, opset)
    model = program.model_proto
    if model.functions:
        raise RuntimeError("exported VQ decoder still has ONNX functions; expected them inlined")
    factor = vq.downsample
    pixel_dims = ["batch", 3, f"height*{factor}", f"width*{factor}"]
    _name_dims(model.graph.input[0], ["batch", "height", "width"])
    _name_dims(model.graph.output[0], pixel_dims)
    if weights is not None:
        _externalize(model, weights, "vq_decoder/")
    model.ir_version = 10        # ONNX Runtime 1.31 reads at most IR 13
    io = {"inputs": [("tokens", TensorProto.INT64, ["batch", "height", "width"])],
          "outputs": [("pixels", TensorProto.FLOAT, pixel_dims)]}
    return model, describe(io)


def _name_dims(value: onnx.ValueInfoProto, dims: list) -> None:
    shape = value.type.tensor_type.shape
    for d, want in zip(shape.dim, dims):
        if isinstance(want, int):
            d.dim_value = want
        else:
            d.dim_param = want


def _externalize(model: onnx.ModelProto, weights: ExternalWeights, prefix: str) -> None:
    """Move initializers of the weights file's dtype into it; the graph keeps their names."""
    want = ONNX_DTYPE[weights.dtype]
    for init in model.graph.initializer:
        if init.data_type != want or int(np.prod(init.dims)) < MIN_EXTERNAL:
            continue
        raw = init.raw_data if init.HasField("raw_data") else onnx.numpy_helper.to_array(init).tobytes()
        tensor = torch.frombuffer(bytearray(raw), dtype=weights.dtype).reshape(tuple(init.dims))
        ext = weights.add(prefix + init.name, tensor)
        init.ClearField("raw_data")
        for field in ("float_data", "int32_data"):
            init.ClearField(field)
        init.data_location = TensorProto.EXTERNAL
        del init.external_data[:]
        init.external_data.extend(ext.external_data)


__all__ = ["ImageGraphs", "LlamaGenC2IGraphs", "LlamaGenT2IGraphs", "export_vq_graph"]
