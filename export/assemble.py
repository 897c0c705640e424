"""Stamp the traced pieces into whole graphs and write every weight once into one shared file.

prefill = prologue -> block x n_layers -> head_last
decode  = prologue -> block_past x n_layers -> head_last
score   = prologue -> block x n_layers -> head_all      (logits for every position: perplexity)

Each weight is stored once, in the layout the first graph asks for (decode first: it is the hot
path); a graph that wants the other layout gets a Transpose node that ONNX Runtime and TensorRT fold
at load time. All graphs reference the same `weights.bin` through ONNX external data.
"""
from __future__ import annotations

import copy
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from ..runtime.weights_file import WeightsFile
from .checkpoint import Checkpoint, load_model_tensor
from .pieces import Piece

ONNX_DTYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}


class ExternalWeights:
    """Every weight of a bundle, written once into the shared weights file (runtime.weights_file, which
    aligns them), and the external-data TensorProtos through which graphs point at them."""

    def __init__(self, path: Path, dtype: torch.dtype):
        self.path, self.dtype = Path(path), dtype
        self.file = WeightsFile(self.path)
        self.stored: dict[str, TensorProto] = {}
        self.layout: dict[str, str] = {}      # parameter -> layout it is stored in ("" or "T")

    @property
    def offset(self) -> int:
        """Bytes written so far (the file's size)."""
        return self.file.offset

    def add(self, name: str, tensor: torch.Tensor) -> TensorProto:
        data = tensor.detach().to(self.dtype).contiguous()
        offset, length = self.file.put(name, data.view(torch.uint8).numpy())
        proto = TensorProto(name=name, data_type=ONNX_DTYPE[self.dtype], dims=list(data.shape),
                            data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            proto.external_data.add(key=key, value=value)
        self.stored[name] = proto
        return proto

    def close(self):
        self.file.close()


class GraphBuilder:
    """Collects nodes and initializers of one graph while pieces are instantiated into it."""

    def __init__(self, ckpt: Checkpoint, weights: ExternalWeights):
        self.ckpt, self.weights = ckpt, weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}

    def weight(self, param: str, layout: str) -> str:
        """Name of a value holding `param` in `layout`, storing it in the weights file on first use."""
        weights = self.weights
        if param not in weights.layout:
            tensor = load_model_tensor(self.ckpt.tensors, param)
            stored_name = param + (".T" if layout == "T" else "")
            weights.add(stored_name, tensor.t() if layout == "T" else tensor)
            weights.layout[param] = layout
        stored_layout = weights.layout[param]
        stored_name = param + (".T" if stored_layout == "T" else "")
        self.initializers[stored_name] = weights.stored[stored_name]
        if stored_layout == layout:
            return stored_name
        # The other layout: transpose at load time rather than storing the weight twice.
        out = param + (".T" if layout == "T" else "")
        if not any(out in n.output for n in self.nodes):
            self.nodes.insert(0, helper.make_node("Transpose", [stored_name], [out], name=f"{out}/Transpose", perm=[1, 0]))
        return out

    def add(self, piece: Piece, scope: str, layer: int | None, bind: dict[str, str], shared_scope: str) -> None:
        """Instantiate a piece: values get `scope/` prefixes, bound inputs/outputs take outer names."""
        consts = {}
        for init in piece.graph.initializer:
            name = f"{shared_scope}/{init.name}"       # identical in every instance: share it
            consts[init.name] = name
            if name not in self.initializers:
                shared = copy.deepcopy(init)
                shared.name = name
                self.initializers[name] = shared

        def rename(v: str) -> str:
            if not v:
                return v
            if v in bind:
                return bind[v]
            if v in consts:
                return consts[v]
            if v.startswith("@w:"):
                param, layout = v[3:].split("|")
                if layer is not None:
                    param = param.replace("layers.0.", f"layers.{layer}.", 1)
                return self.weight(param, layout)
            return f"{scope}/{v}"

        for node in piece.graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise RuntimeError(f"piece node {node.name} has a subgraph; the assembler does not handle those")
            stamped = copy.deepcopy(node)
            stamped.name = f"{scope}/{node.name or node.op_type}"
            stamped.input[:] = [rename(v) for v in node.input]
            stamped.output[:] = [rename(v) for v in node.output]
            self.nodes.append(stamped)

    def prune(self, outputs: list[str]) -> None:
        """Drop nodes whose results no graph output needs (the score graph's K/V)."""
        needed, kept = set(outputs), []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.output):
                kept.append(node)
                needed.update(node.input)
        self.nodes = kept[::-1]
        self.initializers = {k: v for k, v in self.initializers.items() if k in needed}

    def to_model(self, name: str, inputs, outputs, opset: int) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=list(self.initializers.values()))
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="ardeploy")
        # onnx writes the newest IR version by default, which ONNX Runtime may not read yet.
        model.ir_version = 10
        return model


def build_graph(kind: str, pieces: dict[str, Piece], ckpt: Checkpoint, weights: ExternalWeights,
                io: dict, opset: int, prologue: str = "prologue") -> onnx.ModelProto:
    """kind: prefill | decode | score. `io` gives the contract's ValueInfoProtos (see contract.graph_io);
    prologue: the piece the graph starts from (LlamaGen t2i's prefill starts from caption features)."""
    spec = ckpt.spec
    builder = GraphBuilder(ckpt, weights)
    first = pieces[prologue]
    builder.add(first, "prologue", None,
                {**{name: name for name in first.inputs},
                 "io_x": "hidden.0", "io_cos": "rope.cos", "io_sin": "rope.sin", "io_mask": "attn.mask"}, prologue)
    block = pieces["block_past" if kind == "decode" else "block"]
    for i in range(spec.n_layers):
        bind = {"io_x": f"hidden.{i}", "io_cos": "rope.cos", "io_sin": "rope.sin", "io_mask": "attn.mask",
                "io_y": f"hidden.{i + 1}", "io_k": f"present.{i}.key", "io_v": f"present.{i}.value"}
        if kind == "decode":
            bind.update({"io_past_k": f"past.{i}.key", "io_past_v": f"past.{i}.value"})
        builder.add(block, f"layers.{i}", i, bind, "block")
    head = pieces["head_all" if kind == "score" else "head_last"]
    builder.add(head, "head", None, {"io_x": f"hidden.{spec.n_layers}", "io_logits": "logits"}, "head")
    inputs, outputs = io["inputs"], io["outputs"]
    builder.prune([o.name for o in outputs])
    return builder.to_model(kind, inputs, outputs, opset)
