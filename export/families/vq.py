"""VQ decoders as export-friendly modules: codes [B, h, w] (int64) -> pixels [B, 3, H, W] (float32, about -1..1).

* `VQ16Decoder`: LlamaGen's VQ-16/VQ-8 tokenizer decoder (the same architecture as `transformers`'
  JanusVQVAE): l2-normalised codebook (normalised once on load), 1x1 post-quant conv, taming-style
  decoder (GroupNorm 32, swish, a single-head attention block at the lowest resolution, nearest x2
  upsampling).
* `Emu3VQDecoder`: Emu3's MoVQ video decoder, restricted to temporal frame 0. Every temporal conv
  is causal with zero padding in front, so frame 0 of each temporal stage depends only on frame 0 of
  its input and only on the last temporal tap of each 3D kernel: the 3D convs become 2D convs with
  that tap's weights (sliced on load, exact) and the 2D decoder runs once per image instead of 4 times.

Norms and attention softmax run in float32 whatever the weights' dtype (as RMSNorm does in the LM).
Module and parameter names follow the source checkpoints, so loading is a rename at most.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoint import LazyTensor
from ..errors import CheckpointError
from ..torch_files import training_state_dict
from . import VQSource


def swish(x):
    return x * torch.sigmoid(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _upsample2x(x):
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


# -- LlamaGen VQ-16 -----------------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, q/k/v/out as 1x1 convs."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        B, C, H, W = x.shape
        q = self.q(h).reshape(B, C, H * W).transpose(1, 2)          # [B, N, C]
        k = self.k(h).reshape(B, C, H * W)                           # [B, C, N]
        v = self.v(h).reshape(B, C, H * W)                           # [B, C, N]
        w = torch.softmax((torch.bmm(q, k) * C ** -0.5).float(), dim=-1).to(x.dtype)   # [B, Nq, Nk]
        out = torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(_upsample2x(x))


class VQ16Body(nn.Module):
    """The conv decoder; `conv_blocks[0]` works at the lowest resolution (it carries the attention)."""

    def __init__(self, z_channels: int, level_channels: list[int], num_res_blocks: int, out_channels: int = 3):
        super().__init__()
        n = len(level_channels)
        c = level_channels[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(n)):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                block.res.append(ResnetBlock(c, level_channels[level]))
                c = level_channels[level]
                if level == n - 1:
                    block.attn.append(AttnBlock(c))
            if level != 0:
                block.upsample = Upsample(c)
            self.conv_blocks.append(block)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for i, block in enumerate(self.conv_blocks):
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[j](h)
            if i != len(self.conv_blocks) - 1:
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VQ16Decoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg["codebook_size"], cfg["embed_dim"])   # rows l2-normalised
        self.post_quant_conv = nn.Conv2d(cfg["embed_dim"], cfg["z_channels"], 1)
        self.decoder = VQ16Body(cfg["z_channels"], cfg["level_channels"], cfg["num_res_blocks"])

    def forward(self, codes):
        z = self.quantize.embedding(codes).permute(0, 3, 1, 2)      # [B, e, h, w]
        return self.decoder(self.post_quant_conv(z)).float()


def vq16_config(sd: dict[str, torch.Tensor], source: str) -> dict:
    """Read the decoder's shape from its tensors (LlamaGen hard-codes ch=128, 2 res blocks; VQ-8 and VQ-16 differ)."""
    try:
        n_codes, embed = sd["quantize.embedding.weight"].shape
        z = sd["post_quant_conv.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.conv_blocks."))
        res = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("decoder.conv_blocks.0.res."))
        # conv_blocks[i] works at level n-1-i; its output channels are those of its first res block's conv1.
        chans = [sd[f"decoder.conv_blocks.{levels - 1 - lv}.res.0.conv1.weight"].shape[0] for lv in range(levels)]
    except (KeyError, ValueError):
        raise CheckpointError(f"{source}: not a LlamaGen VQ tokenizer checkpoint (no quantize/post_quant_conv/decoder tensors)") from None
    return {"codebook_size": int(n_codes), "embed_dim": int(embed), "z_channels": int(z), "level_channels": chans,
            "num_res_blocks": res - 1}


def load_vq16(path):
    """LlamaGen VQ tokenizer `.pt` -> VQSource (decoder, post-quant conv and normalised codebook only)."""
    sd = training_state_dict(path, "quantize.embedding.weight")
    cfg = vq16_config(sd, str(path))
    keep = {k: v for k, v in sd.items() if k.startswith(("decoder.", "post_quant_conv.")) or k == "quantize.embedding.weight"}
    tensors = {k: LazyTensor(tuple(v.shape), lambda v=v: v) for k, v in keep.items()}
    emb = keep["quantize.embedding.weight"]
    # LlamaGen l2-normalises the codebook before the lookup (codebook_l2_norm=True in every released tokenizer).
    tensors["quantize.embedding.weight"] = LazyTensor(tuple(emb.shape), lambda: F.normalize(emb.float(), p=2, dim=-1))
    return VQSource("vq16", cfg, tensors, str(path))


# -- Emu3 (frame 0 of the MoVQ video decoder) ---------------------------------------------------------
class SpatialNorm(nn.Module):
    """GroupNorm(x) * conv_y(zq) + conv_b(zq), zq resized (nearest) to x's size."""

    def __init__(self, zq_channels: int, channels: int):
        super().__init__()
        self.norm_layer = _norm(channels)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)

    def forward(self, x, zq):
        zq = F.interpolate(zq, size=x.shape[-2:], mode="nearest")
        return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)


class EmuResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, zq_channels: int):
        super().__init__()
        self.norm1, self.conv1 = SpatialNorm(zq_channels, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = SpatialNorm(zq_channels, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x, zq):
        h = self.conv1(swish(self.norm1(x, zq)))
        h = self.conv2(swish(self.norm2(h, zq)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class EmuAttention(nn.Module):
    """Multi-head self-attention over h*w positions with Linear projections (biases)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):                                            # x [B, N, C]
        B, N, C = x.shape
        q, k, v = (p(x).reshape(B, N, self.heads, self.hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        w = torch.softmax((torch.matmul(q, k.transpose(2, 3)) * self.hd ** -0.5).float(), dim=-1).to(x.dtype)
        return self.out_proj(torch.matmul(w, v).transpose(1, 2).reshape(B, N, C))


def _attend(attn: EmuAttention, norm: SpatialNorm, x, zq):
    B, C, H, W = x.shape
    h = norm(x, zq).reshape(B, C, H * W).transpose(1, 2)
    return x + attn(h).transpose(1, 2).reshape(B, C, H, W)


class TemporalResnetBlock(nn.Module):
    """Frame 0 of a causal temporal ResNet block: BatchNorm (running stats), swish, last-tap 3x3 convs."""

    def __init__(self, c: int):
        super().__init__()
        self.norm1, self.norm2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.conv1, self.conv2 = nn.Module(), nn.Module()
        self.conv1.conv, self.conv2.conv = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = self.conv1.conv(swish(self.norm1(x)))
        h = self.conv2.conv(swish(self.norm2(h)))
        return x + h


class EmuMiddle(nn.Module):
    def __init__(self, c: int, zq: int, heads: int):
        super().__init__()
        self.block_1, self.block_2 = EmuResnetBlock(c, c, zq), EmuResnetBlock(c, c, zq)
        self.attn_1, self.attn_norm = EmuAttention(c, heads), SpatialNorm(zq, c)

    def forward(self, x, zq):
        x = self.block_1(x, zq)
        return self.block_2(_attend(self.attn_1, self.attn_norm, x, zq), zq)


class Emu3VQBody(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        latent, zq, base, mult = cfg["latent_channels"], cfg["embed_dim"], cfg["base_channels"], cfg["channel_multiplier"]
        n_up = (cfg["temporal_downsample_factor"]).bit_length() - 1
        self.time_res_stack = nn.ModuleList(TemporalResnetBlock(latent) for _ in range(cfg["num_res_blocks"]))
        self.time_conv = nn.ModuleList()
        for _ in range(n_up):
            m = nn.Module()
            m.conv = nn.Module()
            m.conv.conv = nn.Conv2d(latent, latent, 3, padding=1)
            self.time_conv.append(m)
        c = base * mult[-1]
        self.conv_in = nn.Conv2d(latent, c, 3, padding=1)
        self.middle_block = EmuMiddle(c, zq, cfg["num_attention_heads"])
        self.up_block = nn.Module()
        self.up_block.up = nn.ModuleList()
        levels = []
        for level in reversed(range(len(mult))):          # built lowest resolution first, stored by level
            up = nn.Module()
            up.block, up.attn, up.attn_norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg["num_res_blocks"] + 1):
                up.block.append(EmuResnetBlock(c, base * mult[level], zq))
                c = base * mult[level]
                if level in cfg["attn_resolutions"]:
                    up.attn.append(EmuAttention(cfg["hidden_size"], cfg["num_attention_heads"]))
                    up.attn_norms.append(SpatialNorm(zq, c))
            if level != 0:
                up.upsample = Upsample(c)
            levels.insert(0, up)
        self.up_block.up.extend(levels)
        self.norm_out = SpatialNorm(zq, c)
        self.conv_out = nn.Conv2d(c, cfg["out_channels"], 3, padding=1)

    def temporal(self, x):
        for block in self.time_res_stack:
            x = block(x)
        for m in self.time_conv:
            x = swish(m.conv.conv(x))
        return x

    def forward(self, post_quant, quant):
        h, zq = self.temporal(post_quant), self.temporal(quant)
        h = self.middle_block(self.conv_in(h), zq)
        ups = self.up_block.up
        for i in reversed(range(len(ups))):
            up = ups[i]
            for j, block in enumerate(up.block):
                h = block(h, zq)
                if len(up.attn):
                    h = _attend(up.attn[j], up.attn_norms[j], h, zq)
            if i != 0:
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h, zq)))


class Emu3VQDecoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        if cfg["latent_channels"] != cfg["embed_dim"]:
            raise CheckpointError("Emu3 VQ: latent_channels must equal embed_dim (the decoder stacks both)")
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg["codebook_size"], cfg["embed_dim"])
        self.post_quant_conv = nn.Module()
        self.post_quant_conv.conv = nn.Conv2d(cfg["embed_dim"], cfg["latent_channels"], 1)
        self.decoder = Emu3VQBody(cfg)

    def forward(self, codes):
        quant = self.quantize.embedding(codes).permute(0, 3, 1, 2)  # [B, e, h, w]
        return self.decoder(self.post_quant_conv.conv(quant), quant).float()


EMU3_VQ_KEYS = ("codebook_size", "embed_dim", "latent_channels", "base_channels", "channel_multiplier",
                "num_res_blocks", "attn_resolutions", "hidden_size", "num_attention_heads",
                "temporal_downsample_factor", "out_channels")


def emu3_vq_source(vq_config: dict, raw: dict[str, LazyTensor], source: str):
    """Emu3VQVAE tensors (names without the `vqmodel.` prefix) -> VQSource for the frame-0 decoder."""
    defaults = {"out_channels": 3, "temporal_downsample_factor": 4}
    cfg = {k: vq_config.get(k, defaults.get(k)) for k in EMU3_VQ_KEYS}
    if None in cfg.values():
        raise CheckpointError(f"{source}: vq_config lacks {[k for k, v in cfg.items() if v is None]}")
    tf = cfg["temporal_downsample_factor"]
    if tf & (tf - 1):
        raise CheckpointError(f"{source}: temporal_downsample_factor {tf} is not a power of two")

    def last_tap(t: LazyTensor) -> LazyTensor:
        # Causal 3D kernel [out, in, kt, kh, kw]: frame 0 sees only the last temporal tap.
        return LazyTensor(t.shape[:2] + t.shape[3:], lambda: t.load()[:, :, -1].contiguous())

    tensors = {}
    for name, t in raw.items():
        if not name.startswith(("decoder.", "post_quant_conv.", "quantize.embedding.")) or name.endswith("num_batches_tracked"):
            continue
        tensors[name] = last_tap(t) if len(t.shape) == 5 else t
    return VQSource("emu3", cfg, tensors, source)


def build_vq_module(vq, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The decoder module with the source's tensors (strict: every parameter and buffer accounted for)."""
    cls = VQ16Decoder if vq.kind == "vq16" else Emu3VQDecoder
    with torch.device("meta"):
        module = cls(vq.config)
    state = {k: t.load() for k, t in vq.tensors.items()}
    expected = module.state_dict()
    for k in list(state):
        if k.endswith("num_batches_tracked"):
            state.pop(k)
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} != {list(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{vq.source}: VQ decoder tensors do not match its configuration: "
                              + "; ".join([f"missing {', '.join(missing[:3])}"] * bool(missing)
                                          + [f"unexpected {', '.join(unexpected[:3])}"] * bool(unexpected) + wrong[:3]))
    for k, v in expected.items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.zeros((), dtype=torch.long)
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(dtype).eval()
