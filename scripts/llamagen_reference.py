"""A plain PyTorch rendering of LlamaGen's cached generation loop (autoregressive/models/gpt.py +
generate.py), the reference that tests/test_image_llamagen.py compares our runtime with and that
scripts/bench_image.py times: fused wqkv, interleaved-pair 2D rotary table with zero rows for the
prefix, gpt-fast style KV cache and boolean mask, CFG on raw logits (`uncond + (cond - uncond) * s`,
cond rows first), temperature, top-k, top-p (HF v3 style), softmax.

Its only departure: the categorical draw uses the same per-image numpy generators as our runtime
(inverse CDF) instead of torch.multinomial, so that tokens can be compared one for one.
Development code (needs torch): it is not part of the installed package.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

CAPTION_DIM, CAPTION_T = 32, 120       # the tests' tiny caption features: width and padded length


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def grid_rope_table(grid: int, head_dim: int, prefix: int, base: float = 10000.0) -> torch.Tensor:
    """(prefix + grid^2, head_dim/2, 2) cos/sin pairs: zero rows for the prefix, raster order after."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(grid), freqs)
    ang = torch.cat([f[:, None, :].expand(grid, grid, -1), f[None, :, :].expand(grid, grid, -1)], dim=-1)
    table = torch.stack([ang.cos(), ang.sin()], dim=-1).flatten(0, 1)
    return torch.cat([torch.zeros(prefix, half, 2), table])


def rotate_pairs(x, table):
    """x [B, S, H, D] rotated by interleaved pairs (2i, 2i+1); table [S, D/2, 2]."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    t = table.view(1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * t[..., 0] - xs[..., 1] * t[..., 1],
                       xs[..., 1] * t[..., 0] + xs[..., 0] * t[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


def rms(x, w, eps=1e-5):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


class RefLlamaGen(nn.Module):
    """LlamaGen's GPT in its own layout; the defaults are the tests' tiny model."""

    def __init__(self, model_type: str = "c2i", grid: int = 8, dim: int = 64, n_layer: int = 2,
                 n_head: int = 4, vocab: int = 64, num_classes: int = 10, caption_dim: int = CAPTION_DIM,
                 caption_len: int = CAPTION_T):
        super().__init__()
        self.model_type, self.grid, self.dim, self.n_head, self.num_classes = model_type, grid, dim, n_head, num_classes
        self.prefix = 1 if model_type == "c2i" else caption_len
        self.hd = dim // n_head
        ffn = find_multiple(int(2 * 4 * dim / 3), 256)
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.cls_embedding = nn.Module()
        if model_type == "c2i":
            self.cls_embedding.embedding_table = nn.Embedding(num_classes + 1, dim)
        else:
            self.cls_embedding.cap_proj = nn.Module()
            self.cls_embedding.cap_proj.fc1 = nn.Linear(caption_dim, dim, bias=False)
            self.cls_embedding.cap_proj.fc2 = nn.Linear(dim, dim, bias=False)
            self.cls_embedding.register_buffer("uncond_embedding",
                                               torch.randn(caption_len, caption_dim) / caption_dim ** 0.5)
        self.layers = nn.ModuleList()
        for _ in range(n_layer):
            layer = nn.Module()
            layer.attention = nn.Module()
            layer.attention.wqkv = nn.Linear(dim, 3 * dim, bias=False)
            layer.attention.wo = nn.Linear(dim, dim, bias=False)
            layer.feed_forward = nn.Module()
            layer.feed_forward.w1 = nn.Linear(dim, ffn, bias=False)
            layer.feed_forward.w3 = nn.Linear(dim, ffn, bias=False)
            layer.feed_forward.w2 = nn.Linear(ffn, dim, bias=False)
            layer.attention_norm = nn.Module()
            layer.attention_norm.weight = nn.Parameter(torch.ones(dim))
            layer.ffn_norm = nn.Module()
            layer.ffn_norm.weight = nn.Parameter(torch.ones(dim))
            self.layers.append(layer)
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(dim))
        self.output = nn.Linear(dim, vocab, bias=False)
        # a buffer so that .to(device) moves it; not in the state dict (bench_image.py re-makes it in float32
        # after casting to fp16, as LlamaGen computes freqs_cis after the cast)
        self.register_buffer("table", grid_rope_table(grid, self.hd, self.prefix), persistent=False)
        with torch.no_grad():   # informative random weights (LlamaGen zero-inits the head; we must not)
            for n, p in self.named_parameters():
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else torch.randn_like(p) * p.shape[-1] ** -0.5)

    def cond_embeddings(self, cond):
        if self.model_type == "c2i":
            return self.cls_embedding.embedding_table(cond)[:, None, :]
        cp = self.cls_embedding.cap_proj
        return cp.fc2(F.gelu(cp.fc1(cond), approximate="tanh"))

    def forward(self, h, input_pos, mask, caches):
        B, S, _ = h.shape
        D = self.dim
        table = self.table[input_pos]
        for layer, (kc, vc) in zip(self.layers, caches):
            x = rms(h, layer.attention_norm.weight)
            q, k, v = layer.attention.wqkv(x).split([D, D, D], dim=-1)
            q, k, v = (t.view(B, S, self.n_head, self.hd) for t in (q, k, v))
            q, k = rotate_pairs(q, table), rotate_pairs(k, table)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            kc[:, :, input_pos], vc[:, :, input_pos] = k, v
            out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
            h = h + layer.attention.wo(out.transpose(1, 2).reshape(B, S, D))
            x = rms(h, layer.ffn_norm.weight)
            h = h + layer.feed_forward.w2(F.silu(layer.feed_forward.w1(x)) * layer.feed_forward.w3(x))
        return self.output(rms(h, self.norm.weight)).float()

    def gpt_state_dict(self) -> dict:
        sd = {k: v.clone() for k, v in self.state_dict().items()}
        sd["freqs_cis"] = self.table.clone()          # a stray buffer some released checkpoints carry
        return sd


def filter_v3(logits, top_k: int, top_p: float):
    """HF v3 top_k_top_p_filtering, as LlamaGen's generate.py uses it."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)))[0][..., -1, None]
        logits[logits < kth] = -float("inf")
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        logits[remove.scatter(1, idx, remove)] = -float("inf")
    return logits


def draw(logits, temperature, top_k, top_p, rngs):
    logits = filter_v3(logits / max(temperature, 1e-5), top_k, top_p)
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    cdf = np.cumsum(probs, axis=-1)
    return torch.tensor([min(int(np.searchsorted(c, rng.random() * c[-1], side="right")), len(c) - 1)
                         for c, rng in zip(cdf, rngs)])


@torch.no_grad()
def ref_generate(model: RefLlamaGen, cond, cfg_scale=4.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0,
                 seed=0, emb_masks=None, forced=None):
    """LlamaGen's generate(): returns codes [B, g*g] and each step's raw logits [rows, V].
    forced: codes [B, g*g] to feed instead of drawing (teacher forcing)."""
    B = len(cond)
    rngs = [np.random.default_rng(seed + b) for b in range(B)]
    guided = cfg_scale > 1.0
    if model.model_type == "c2i":
        combined = torch.cat([cond, torch.full_like(cond, model.num_classes)]) if guided else cond
    else:
        combined = torch.cat([cond, torch.zeros_like(cond) + model.cls_embedding.uncond_embedding]) if guided else cond
    T, N = model.prefix, model.grid ** 2
    L = find_multiple(T + N, 8)
    R = len(combined)
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool))[None].repeat(R, 1, 1)
    if emb_masks is not None:
        m = torch.cat([emb_masks, emb_masks]) if guided else emb_masks
        mask[:, :, :T] = mask[:, :, :T] * m[:, None, :].bool()
        mask = mask | torch.eye(L, dtype=torch.bool)
    caches = [(torch.zeros(R, model.n_head, L, model.hd), torch.zeros(R, model.n_head, L, model.hd))
              for _ in model.layers]
    pos = torch.arange(T)
    logits = model(model.cond_embeddings(combined), pos, mask[:, None, pos], caches)[:, -1]
    raw, codes = [logits.clone()], []
    for t in range(N):
        if t > 0:
            pos = torch.tensor([T + t - 1])
            x = torch.cat([codes[-1], codes[-1]]) if guided else codes[-1]
            logits = model(model.tok_embeddings(x[:, None]), pos, mask[:, None, pos], caches)[:, -1]
            raw.append(logits.clone())
        if guided:
            c, u = logits.split(B)
            use_cfg = not (cfg_interval > -1 and t - 1 > cfg_interval)
            logits = u + (c - u) * cfg_scale if use_cfg else c
        codes.append(forced[:, t] if forced is not None else draw(logits.clone(), temperature, top_k, top_p, rngs))
    return torch.stack(codes, 1), [r.numpy() for r in raw]
