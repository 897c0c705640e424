"""Trace the three pieces every graph is made of: prologue, one decoder block, head.

`torch.export` spends about 1.4 s per decoder layer on this 2-core machine, so tracing a whole
30-layer model three times would take minutes. All layers run the same code, so we trace one block
(with and without a past) and let `assemble.py` stamp it out once per layer with that layer's weights.

Piece inputs and outputs are named `io_*`: the exporter names values after aten ops (`cos`,
`sin`, ...), and an output called like an op once came out produced twice.

Pieces are traced with random weights whose values are all distinct. After export, each weight-like
initializer is found again by its values: either a parameter itself or its transpose (the exporter
folds `Linear`'s transpose into the initializer). It becomes a placeholder `@w:<name>|<layout>` that
`assemble.py` points at the shared weights file.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from .model import Decoder, init_constants
from .spec import ModelSpec

TRACE_VOCAB = 64   # the vocabulary size only shapes weights, never a graph constant: trace with a small one


@dataclass
class Piece:
    graph: onnx.GraphProto          # values consumed from weights are named "@w:<param>|<layout>"
    inputs: list[str]
    outputs: list[str]


class _Prologue(nn.Module):
    def __init__(self, dec):
        super().__init__()
        self.dec = dec

    def forward(self, input_ids, attention_mask):
        x, cos, sin, mask = self.dec.prologue(input_ids, attention_mask)
        return (x, *self.dec.block_inputs(cos, sin, mask))


class _Head(nn.Module):
    def __init__(self, dec, all_positions: bool):
        super().__init__()
        self.dec, self.all_positions = dec, all_positions

    def forward(self, x):
        return self.dec.head(x if self.all_positions else x[:, -1, :])


def trace_model(spec: ModelSpec, dtype: torch.dtype, decoder: type[Decoder]) -> Decoder:
    """One-layer `decoder` with the real dimensions (small vocabulary) and distinct random weights."""
    trace_spec = dataclasses.replace(spec, n_layers=1, vocab_size=min(spec.vocab_size, TRACE_VOCAB))
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        dec = decoder(trace_spec)
    state = {n: torch.randn(p.shape, generator=gen) for n, p in dec.state_dict().items()}
    dec.load_state_dict(state, assign=True)
    return init_constants(dec.to(dtype).eval())


def _weight_placeholders(model_ir, params: dict[str, torch.Tensor]) -> None:
    """Rename initializers that hold a parameter (or its transpose) to `@w:<name>|<layout>` and drop their data."""
    def key(shape, raw: bytes):
        return tuple(shape), raw[:64], raw[-64:]

    # Index parameters by shape and a fingerprint of their bytes, so matching stays linear.
    index: dict[tuple, list[tuple[str, str, bytes]]] = {}
    for name, p in params.items():
        for layout, t in (("", p), ("T", p.t() if p.dim() == 2 else None)):
            if t is not None:
                raw = t.detach().contiguous().view(torch.uint8).numpy().tobytes()
                index.setdefault(key(t.shape, raw), []).append((name, layout, raw))
    graph = model_ir.graph
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or not value.dtype.is_floating_point() or tensor.size < 2:
            continue
        raw = tensor.tobytes()
        for name, layout, cand in index.get(key(tensor.shape.numpy(), raw), []):
            if cand == raw:
                graph.initializers.pop(value.name)
                value.const_value = None
                value.name = f"@w:{name}|{layout}"
                break


def to_piece(program, params: dict[str, torch.Tensor]) -> Piece:
    """An exported program -> Piece: parameters become weight placeholders, value shapes dropped."""
    model_ir = program.model
    _weight_placeholders(model_ir, params)
    if model_ir.functions:
        raise RuntimeError("exported piece still has ONNX functions; expected them inlined")
    import onnx_ir as ir  # ships with onnxscript, which torch.onnx uses
    proto = ir.serde.serialize_model(model_ir)
    graph = proto.graph
    produced = [o for node in graph.node for o in node.output if o]
    if len(produced) != len(set(produced)):
        dup = next(o for o in produced if produced.count(o) > 1)
        raise RuntimeError(f"exported piece is not in SSA form: {dup!r} is produced twice")
    del graph.value_info[:]           # shapes of the traced (small-vocabulary) piece; ORT/TRT re-infer them
    return Piece(graph=graph, inputs=[i.name for i in graph.input], outputs=[o.name for o in graph.output])


def export_program(module, args, names_in, names_out, dynamic_shapes, opset: int):
    """torch.onnx.export (dynamo) of one module, quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        return torch.onnx.export(module, args, input_names=names_in, output_names=names_out,
                                 dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=opset,
                                 optimize=True, verbose=False, report=False)


def trace_pieces(spec: ModelSpec, dtype: torch.dtype, opset: int, decoder: type[Decoder], need_score: bool = True,
                 progress=None) -> dict[str, Piece]:
    """Pieces of `decoder`: prologue, block (no past), block_past, head_last, head_all."""
    from torch.export import Dim
    dec = trace_model(spec, dtype, decoder)
    params = dict(dec.named_parameters())
    B, S, P = 2, 3, 4   # example sizes >= 2 so torch.export keeps every dimension symbolic
    batch, seq, past, total = (Dim("batch", min=1, max=1 << 14), Dim("seq", min=1, max=1 << 20),
                               Dim("past", min=1, max=1 << 20), Dim("total", min=1, max=1 << 21))
    d, hd, nkv = spec.hidden_size, spec.head_dim, spec.n_kv_heads
    ids = torch.randint(0, dec.spec.vocab_size, (B, S))
    x = torch.randn(B, S, d).to(dtype)
    # distinct objects: export merges aliases
    cos, sin = torch.randn(B, S, 1, hd).to(dtype), torch.randn(B, S, 1, hd).to(dtype)
    pk = torch.randn(P, B, nkv, hd).to(dtype)
    block = dec.layers[0]
    jobs = {
        "prologue": (_Prologue(dec), (ids, torch.ones(B, P + S, dtype=torch.int64)),
                     ["input_ids", "attention_mask"], ["io_x", "io_cos", "io_sin", "io_mask"],
                     {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total}}),
        "block": (block, (x, cos, sin, torch.zeros(B, 1, 1, S, S)), ["io_x", "io_cos", "io_sin", "io_mask"], ["io_y", "io_k", "io_v"],
                  {"x": {0: batch, 1: seq}, "cos": {0: batch, 1: seq}, "sin": {0: batch, 1: seq},
                   "mask": {0: batch, 3: seq, 4: seq}}),
        "block_past": (block, (x, cos, sin, torch.zeros(B, 1, 1, S, P + S), pk, pk.clone()),
                       ["io_x", "io_cos", "io_sin", "io_mask", "io_past_k", "io_past_v"], ["io_y", "io_k", "io_v"],
                       {"x": {0: batch, 1: seq}, "cos": {0: batch, 1: seq}, "sin": {0: batch, 1: seq},
                        "mask": {0: batch, 3: seq, 4: total}, "past_k": {0: past, 1: batch},
                        "past_v": {0: past, 1: batch}}),
        "head_last": (_Head(dec, False), (x,), ["io_x"], ["io_logits"], {"x": {0: batch, 1: seq}}),
    }
    if need_score:
        jobs["head_all"] = (_Head(dec, True), (x,), ["io_x"], ["io_logits"], {"x": {0: batch, 1: seq}})
    pieces = {}
    for name, (module, args, names_in, names_out, dynamic_shapes) in jobs.items():
        if progress:
            progress(name)
        program = export_program(module, args, names_in, names_out, dynamic_shapes, opset)
        pieces[name] = to_piece(program, params)
    return pieces
