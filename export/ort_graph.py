"""The ONNX Runtime flavor of the decode graph: ONNX Runtime's fused operators, the KV cache updated in place.

Written node by node from the ModelSpec (nothing to trace), one layer after the other:

    SkipSimplifiedLayerNormalization     residual add + RMSNorm in one kernel
    MatMul (q|k|v)                       one weight, the same fused tensor the portable graph reads
    [Qwen3: Split, per-head SimplifiedLayerNormalization of q and k]
    GroupQueryAttention                  rotary inside; past and present are ONE buffer [B, n_kv, max_seq, hd]
    MatMul (o)
    SkipSimplifiedLayerNormalization
    MatMul (gate|up), Split, x * sigmoid(x) * up, MatMul (down)

I/O (see `graph_io`). Each row's tokens sit at cache positions [0, its length) — no padding inside
the cache — so the runtime hands the graph per-row lengths instead of a mask:

    input_ids      int64 [B, S]   row b's real tokens first (right padding)
    seqlens_k      int32 [B]      tokens row b holds after this step, minus one
    total_seq_len  int32 []       the longest row after this step
    last_token     int64 [B]      b * S + index of row b's last real token in this step
    past.{i}.key/value   [B, n_kv, max_seq, hd]  the cache; present.{i}.* must be bound to the same buffer
    -> logits float32 [B, vocab] (of each row's last token), present.{i}.key/value,
       next_token int64 [B] (the argmax of each row's logits: a greedy step on the GPU copies only it)

GroupQueryAttention takes a step's S tokens as positions [seqlens_k + 1 - S, seqlens_k + 1) of each row,
except in a first prompt (S == total_seq_len), where shorter rows may end in padding. ONNX Runtime's CPU
kernel needs head_dim to be a multiple of 16.
"""
from __future__ import annotations

import torch
from onnx import TensorProto, helper

from .assemble import ExternalWeights, GraphBuilder
from .checkpoint import Checkpoint
from .contract import DTYPES
from .model import rope_inv_freq
from .spec import ModelSpec

MS_DOMAIN = "com.microsoft"
GRAPH = "decode_ort"


def supports(spec: ModelSpec) -> str | None:
    """Why the ONNX Runtime flavor cannot express this model (None when it can)."""
    if spec.head_dim % 16:
        return f"head_dim {spec.head_dim} is not a multiple of 16 (ONNX Runtime's GroupQueryAttention needs it)"
    return None


def kv_layout(spec: ModelSpec) -> dict:
    """The cache layout GroupQueryAttention reads and writes in place, recorded in the manifest."""
    return {"order": ["batch", "kv_head", "time", "head_dim"],
            "shape": ["batch", spec.n_kv_heads, "max_seq", spec.head_dim]}


def graph_io(spec: ModelSpec, dtype: str) -> dict[str, list[tuple[str, int, list]]]:
    kv, cache = DTYPES[dtype], ["batch", spec.n_kv_heads, "max_seq", spec.head_dim]
    inputs = [("input_ids", TensorProto.INT64, ["batch", "seq"]), ("seqlens_k", TensorProto.INT32, ["batch"]),
              ("total_seq_len", TensorProto.INT32, []), ("last_token", TensorProto.INT64, ["batch"])]
    outputs = [("logits", TensorProto.FLOAT, ["batch", spec.vocab_size])]
    for i in range(spec.n_layers):
        inputs += [(f"past.{i}.{x}", kv, cache) for x in ("key", "value")]
        outputs += [(f"present.{i}.{x}", kv, cache) for x in ("key", "value")]
    outputs.append(("next_token", TensorProto.INT64, ["batch"]))
    return {"inputs": inputs, "outputs": outputs}


class OrtGraph:
    """Builds decode_ort.onnx into a GraphBuilder, reading weights through the bundle's shared file."""

    def __init__(self, ckpt: Checkpoint, weights: ExternalWeights, max_seq: int):
        self.spec, self.weights, self.max_seq = ckpt.spec, weights, max_seq
        self.builder = GraphBuilder(ckpt, weights)
        self.consts: dict[str, TensorProto] = {}

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs):
        self.builder.nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0] + "/" + op, domain=domain,
                                                   **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def weight(self, param: str, layout: str = "") -> str:
        return self.builder.weight(param, layout)

    def const(self, name: str, values: list[int]) -> str:
        if name not in self.builder.initializers:
            self.builder.initializers[name] = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        return name

    # -- the graph, top to bottom -----------------------------------------------------------------
    def build(self, io: dict, opset: int):
        spec = self.spec
        hidden = self.node("Gather", [self.weight("embed_tokens.weight"), "input_ids"], ["embeddings"])
        cos, sin = self.rotary_tables()
        normed = self.node("SimplifiedLayerNormalization", [hidden, self.weight("layers.0.input_layernorm.weight")],
                           ["layers.0.normed"], axis=-1, epsilon=spec.rms_norm_eps, stash_type=1)
        residual = hidden
        for i in range(spec.n_layers):
            attn = self.attention(i, normed, cos, sin)
            normed, residual = self.add_and_norm(attn, residual, f"layers.{i}.post_attention_layernorm.weight")
            mlp = self.mlp(i, normed)
            following = f"layers.{i + 1}.input_layernorm.weight" if i + 1 < spec.n_layers else "norm.weight"
            normed, residual = self.add_and_norm(mlp, residual, following)
        self.head(normed)
        model = self.builder.to_model(GRAPH, io["inputs"], io["outputs"], opset)
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return model

    ROTARY_NAMES = ("rotary.cos", "rotary.sin")

    def rotary_cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [max_seq, hd/2]: row p rotates cache position p (families override this alone)."""
        angles = torch.arange(self.max_seq, dtype=torch.float32)[:, None] * rope_inv_freq(self.spec)
        return angles.cos(), angles.sin()

    def rotary_tables(self) -> tuple[str, str]:
        """The cos/sin tables as initializers in the shared weights file (stored once)."""
        for name, table in zip(self.ROTARY_NAMES, self.rotary_cos_sin()):
            if name not in self.weights.stored:
                self.weights.add(name, table.contiguous())
            self.builder.initializers[name] = self.weights.stored[name]
        return self.ROTARY_NAMES

    def add_and_norm(self, x: str, residual: str, norm_weight: str) -> tuple[str, str]:
        """(RMSNorm(x + residual), x + residual) in one kernel."""
        name = norm_weight.removesuffix(".weight")
        out = self.node("SkipSimplifiedLayerNormalization", [x, residual, self.weight(norm_weight)],
                        [name + ".normed", "", "", name + ".sum"], domain=MS_DOMAIN, epsilon=self.spec.rms_norm_eps)
        return out[0], out[3]

    def attention(self, i: int, x: str, cos: str, sin: str) -> str:
        spec, p = self.spec, f"layers.{i}.self_attn."
        qkv = self.node("MatMul", [x, self.weight(p + "qkv_proj.weight", "T")], [p + "qkv"])
        if spec.attention_bias:
            qkv = self.node("Add", [qkv, self.weight(p + "qkv_proj.bias")], [p + "qkv.biased"])
        if spec.qk_norm:
            q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
            q, k, v = self.node("Split", [qkv, self.const("split.qkv", [q_dim, kv_dim, kv_dim])],
                                [p + "q", p + "k", p + "v"], axis=-1)
            qkv_inputs = [self.head_norm(q, p + "q_norm.weight", spec.n_heads),
                          self.head_norm(k, p + "k_norm.weight", spec.n_kv_heads), v]
        else:
            qkv_inputs = [qkv, "", ""]          # packed: GroupQueryAttention splits it itself
        attn = self.node("GroupQueryAttention",
                         qkv_inputs + [f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_seq_len", cos, sin],
                         [p + "attn", f"present.{i}.key", f"present.{i}.value"], domain=MS_DOMAIN,
                         num_heads=spec.n_heads, kv_num_heads=spec.n_kv_heads, do_rotary=1, rotary_interleaved=0,
                         scale=float(spec.head_dim ** -0.5))[0]
        out = self.node("MatMul", [attn, self.weight(p + "o_proj.weight", "T")], [p + "o"])
        if spec.attention_out_bias:
            out = self.node("Add", [out, self.weight(p + "o_proj.bias")], [p + "o.biased"])
        return out

    def head_norm(self, x: str, weight: str, heads: int) -> str:
        """Qwen3's per-head RMSNorm of q or k: [B, S, heads*hd] -> [B, S, heads, hd] -> norm -> back."""
        hd = self.spec.head_dim
        per_head = self.node("Reshape", [x, self.const(f"shape.heads.{heads}", [0, 0, heads, hd])], [x + ".heads"])
        normed = self.node("SimplifiedLayerNormalization", [per_head, self.weight(weight)], [x + ".normed"],
                           axis=-1, epsilon=self.spec.rms_norm_eps, stash_type=1)
        return self.node("Reshape", [normed, self.const(f"shape.flat.{heads}", [0, 0, heads * hd])], [x + ".flat"])

    def mlp(self, i: int, x: str) -> str:
        p = f"layers.{i}.mlp."
        gate_up = self.node("MatMul", [x, self.weight(p + "gate_up_proj.weight", "T")], [p + "gate_up"])
        gate, up = self.node("Split", [gate_up], [p + "gate", p + "up"], axis=-1, num_outputs=2)
        silu = self.node("Mul", [gate, self.node("Sigmoid", [gate], [p + "gate.sigmoid"])], [p + "silu"])
        gated = self.node("Mul", [silu, up], [p + "gated"])
        return self.node("MatMul", [gated, self.weight(p + "down_proj.weight", "T")], [p + "down"])

    def head(self, normed: str) -> None:
        """Logits of each row's last token only: gather those rows first, then one [B, d] x [d, vocab]."""
        spec = self.spec
        rows = self.node("Reshape", [normed, self.const("shape.rows", [-1, spec.hidden_size])], ["head.rows"])
        last = self.node("Gather", [rows, "last_token"], ["head.last"], axis=0)
        if spec.tie_word_embeddings:       # the embedding table [vocab, d] read as it is stored
            logits = self.node("Gemm", [last, self.weight("embed_tokens.weight")], ["head.logits"], transB=1)
        else:
            logits = self.node("MatMul", [last, self.weight("lm_head.weight", "T")], ["head.logits"])
        if self.weights.dtype == torch.float32:
            self.node("Identity", [logits], ["logits"])
        else:
            self.node("Cast", [logits], ["logits"], to=TensorProto.FLOAT)
        self.node("ArgMax", ["logits"], ["next_token"], axis=-1, keepdims=0)   # first index on ties, as numpy


def build_ort_graph(ckpt: Checkpoint, weights: ExternalWeights, dtype: str, max_seq: int, opset: int):
    """(decode_ort ModelProto, its contract I/O as (name, type, shape) lists)."""
    from .contract import value_infos
    io = graph_io(ckpt.spec, dtype)
    return OrtGraph(ckpt, weights, max_seq).build(value_infos(io), opset), io


