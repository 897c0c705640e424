"""Export-friendly PyTorch modules of a LLaMA-family decoder (our numerical reference).

Written for `torch.onnx` rather than for training: no Python-side caches, positions and the causal
mask are computed from `attention_mask` inside the graph, and the KV cache is time-major
`[T, B, n_kv_heads, head_dim]` so that a runtime can bind slices of one preallocated buffer.

Parameter names follow the Hugging Face Llama layout without the `model.` prefix
(`embed_tokens.weight`, `layers.0.self_attn.q_proj.weight`, ...); loaders map every format onto them.
q/k/v and gate/up run as one projection each (`qkv_proj`, `gate_up_proj`: see checkpoint.FUSED).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .checkpoint import fuse_projections
from .spec import ModelSpec


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """Inverse frequencies of the half-split rotation, with `linear` or `llama3` scaling applied."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    slowed = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    blend = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - blend) * slowed / factor + blend * slowed
    in_band = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    return torch.where(in_band, blended, slowed)


class RMSNorm(nn.Module):
    """Root-mean-square norm; the reduction always runs in float32 (FP16 overflows otherwise).

    Written as x / sqrt(mean(x^2) + eps) rather than x * rsqrt(...): ONNX Runtime fuses this form into
    one SimplifiedLayerNormalization kernel (it does not recognise Reciprocal(Sqrt)); the two differ by
    at most one rounding.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class HalfRotation(nn.Module):
    """x * cos + rotate_half(x) * sin, with rotate_half as one Gather (halves swapped) and its sign
    folded into sin: 4 graph nodes per tensor instead of 7, and bit-identical (negation is exact)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.init_buffers()

    def init_buffers(self):
        half, hd = self.head_dim // 2, self.head_dim
        self.register_buffer("swap", torch.cat((torch.arange(half, hd), torch.arange(half))), persistent=False)

    def forward(self, x, cos, signed_sin):
        return x * cos + torch.index_select(x, -1, self.swap) * signed_sin


class Rotary(nn.Module):
    """cos/sin for any position, computed from positions (no table, so any length up to max_seq works)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.init_buffers()

    def init_buffers(self):
        self.register_buffer("inv_freq", rope_inv_freq(self.spec), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions.float()[..., None] * self.inv_freq          # [B, S, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                        # [B, S, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        d, hd = spec.hidden_size, spec.head_dim
        self.n_heads, self.n_kv, self.hd = spec.n_heads, spec.n_kv_heads, hd
        # q, k and v read the same input: one matmul (weights stored once, fused), then a split.
        self.qkv_split = [spec.n_heads * hd, spec.n_kv_heads * hd, spec.n_kv_heads * hd]
        self.qkv_proj = nn.Linear(d, sum(self.qkv_split), bias=spec.attention_bias)
        self.o_proj = nn.Linear(spec.n_heads * hd, d, bias=spec.attention_out_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(hd, spec.rms_norm_eps)
            self.k_norm = RMSNorm(hd, spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotate = HalfRotation(hd)
        self.scale = hd ** -0.5

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        """x [B,S,d]; cos/signed sin [B,S,1,hd] and mask [B,1,1,S,T] from `block_inputs`;
        past [P,B,n_kv,hd]. Returns the output and this call's K/V only, time-major [S,B,n_kv,hd]."""
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)
        q = q.view(B, S, self.n_heads, self.hd)
        k = k.view(B, S, self.n_kv, self.hd)
        v = v.view(B, S, self.n_kv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
        new_k, new_v = k.transpose(0, 1), v.transpose(0, 1)            # [S,B,n_kv,hd]
        if past_k is not None:
            all_k, all_v = torch.cat((past_k, new_k), 0), torch.cat((past_v, new_v), 0)
        else:
            all_k, all_v = new_k, new_v
        # Grouped-query attention without repeating K/V: the query heads of a group share one matmul.
        rep = self.n_heads // self.n_kv
        qg = q.view(B, S, self.n_kv, rep, self.hd).permute(0, 2, 3, 1, 4)   # [B,n_kv,rep,S,hd]
        kt = all_k.permute(1, 2, 3, 0).unsqueeze(2)                          # [B,n_kv,1,hd,T]
        vt = all_v.permute(1, 2, 0, 3).unsqueeze(2)                          # [B,n_kv,1,T,hd]
        scores = torch.matmul(qg, kt) * self.scale                          # [B,n_kv,rep,S,T]
        scores = scores.float() + mask
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, vt)                                        # [B,n_kv,rep,S,hd]
        out = out.permute(0, 3, 1, 2, 4).reshape(B, S, self.n_heads * self.hd)
        return self.o_proj(out), new_k, new_v


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)   # gate | up
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


def positions_and_mask(attention_mask: torch.Tensor, S: int):
    """From a [B, T] 0/1 mask (left padding) derive the last S tokens' positions and their additive mask.

    Position = number of real tokens before it; query i (absolute index T-S+i) sees key j when
    j <= T-S+i and key j is a real token. A fully masked row (a pad query) gets a uniform softmax,
    never NaN, because the mask uses float32's lowest finite value instead of -inf.
    """
    T = attention_mask.shape[1]
    positions = (torch.cumsum(attention_mask, dim=1) - 1).clamp(min=0)[:, T - S:]
    q_idx = torch.arange(S, device=attention_mask.device) + (T - S)
    k_idx = torch.arange(T, device=attention_mask.device)
    causal = k_idx[None, :] <= q_idx[:, None]                              # [S, T]
    allowed = causal[None, :, :] & (attention_mask[:, None, :] > 0)        # [B, S, T]
    zero = torch.zeros((), dtype=torch.float32)
    lowest = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
    return positions, torch.where(allowed, zero, lowest)


class Decoder(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.rotary = Rotary(spec)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)

    def prologue(self, input_ids, attention_mask):
        """Embeddings of the S new tokens, their rotary cos/sin and the additive attention mask."""
        x = self.embed_tokens(input_ids)
        positions, mask = positions_and_mask(attention_mask, input_ids.shape[1])
        cos, sin = self.rotary(positions, x.dtype)
        return x, cos, sin, mask

    def block_inputs(self, cos, sin, mask):
        """Shape the prologue's outputs once for every block: cos/sin [B,S,1,hd] broadcast over heads,
        sin carrying rotate_half's sign, mask [B,1,1,S,T] broadcast over kv heads and query groups."""
        half = cos.shape[-1] // 2
        sign = torch.cat((-torch.ones(half), torch.ones(half))).to(sin.dtype)
        return cos[:, :, None, :], (sin * sign)[:, :, None, :], mask[:, None, None, :, :]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head; logits are always float32."""
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm(h), w).float()

    def forward(self, input_ids, attention_mask, past=None, all_logits: bool = False):
        """input_ids [B,S]; attention_mask [B,P+S]; past: list of (k, v) [P,B,n_kv,hd] or None.

        Returns logits float32 ([B,vocab] for the last position, or [B,S,vocab]) and per-layer (k, v)
        of the S new tokens.
        """
        x, cos, sin, mask = self.prologue(input_ids, attention_mask)
        cos, sin, mask = self.block_inputs(cos, sin, mask)
        presents = []
        for i, layer in enumerate(self.layers):
            pk, pv = past[i] if past is not None else (None, None)
            x, k, v = layer(x, cos, sin, mask, pk, pv)
            presents.append((k, v))
        logits = self.head(x if all_logits else x[:, -1, :])
        return logits, presents


def build_model(spec: ModelSpec, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                decoder: type[Decoder] = Decoder) -> Decoder:
    """Create the module on the meta device and adopt the loader's tensors (no random init, no copy).
    decoder: the family's module class (export/registry.py says which; families override the prologue)."""
    with torch.device("meta"):
        model = decoder(spec)
    model.load_state_dict(fuse_projections(state), strict=True, assign=True)
    return init_constants(model.to(dtype).eval())


def init_constants(model: nn.Module) -> nn.Module:
    """(Re)create the non-persistent buffers: modules built on the meta device have none, and
    rotary frequencies must stay float32 whatever dtype the weights were cast to."""
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    return model
