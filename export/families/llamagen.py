"""LlamaGen (FoundationVision): a Llama decoder over VQ codes with a class or caption prefix and 2D RoPE.

What differs from our text decoder, and how it maps onto it:

* Prefix. Class-conditional (c2i) models start from one class embedding; the class table has
  num_classes + 1 rows, the last one being the null class used for classifier-free guidance. We
  append the class table below the code embeddings, so class c is the input id `V + c` (V = the
  codebook size) and the graph contract stays `input_ids` / `attention_mask`. Text-conditional (t2i)
  models start from 120 caption-feature vectors (flan-t5-xl, 2048-d) through a 2-layer MLP; their
  prefill graph takes `caption_features` instead of `input_ids` (see docs/IMAGE_MODELS.md).
* 2D RoPE. Image token i sits at sequence position T + i (T = prefix length) and rotates by the
  angles of its grid cell (row, column): the first head_dim/4 pairs by row * f, the next by column * f.
  LlamaGen rotates interleaved pairs; the q/k rows are permuted on load onto our half-split layout
  (exact), and cos/sin are built in half-split order. Prefix positions get cos = sin = 0, so the prefix
  queries and keys are exactly zero, as in LlamaGen (not the identity rotation).
* Positions are absolute sequence indices (LlamaGen's `input_pos`), not counted from the mask; the
  mask only hides padded caption columns, and every query may attend to itself (LlamaGen forces the
  diagonal so a padded caption row still has one key).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoint import LazyTensor, expected_shapes, unpermute_interleaved
from ..errors import CheckpointError
from ..model import Decoder
from ..spec import ModelSpec
from ..torch_files import training_state_dict
from . import ImageCheckpoint
from .vq import load_vq16

# dim -> (n_layer, n_head) of the published GPT configs (autoregressive/models/gpt.py).
GPT_CONFIGS = {768: ("GPT-B", 12, 12), 1024: ("GPT-L", 24, 16), 1280: ("GPT-XL", 36, 20), 1536: ("GPT-XXL", 48, 24),
               2560: ("GPT-XXXL", 48, 40), 2048: ("GPT-1B", 22, 32), 3200: ("GPT-3B", 24, 32),
               4096: ("GPT-7B", 32, 32)}
CAPTION_TOKENS = 120          # LlamaGen t2i: T5 features padded to 120 tokens
ROPE_BASE = 10000.0


class CaptionProjection(nn.Module):
    """Caption features -> prefix embeddings: Linear, GELU (tanh), Linear; no biases."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class GridRotary(nn.Module):
    """cos/sin of LlamaGen's 2D rotary table, computed from sequence positions, in half-split order."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        cfg = spec.extra["llamagen"]
        self.head_dim, self.grid, self.prefix = spec.head_dim, cfg["grid"], cfg["cls_token_num"]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [S] absolute -> cos, sin [S, head_dim] (zero on prefix rows)."""
        half = self.head_dim // 2
        # The same float32 frequencies as LlamaGen's table (head_dim/4 of them, shared by rows and columns).
        freqs = 1.0 / (ROPE_BASE ** (torch.arange(0, half, 2)[: half // 2].float() / half))
        cell = positions - self.prefix
        row = torch.div(cell, self.grid, rounding_mode="floor").float()
        col = torch.remainder(cell, self.grid).float()
        angles = torch.cat((row[:, None] * freqs, col[:, None] * freqs), dim=-1)     # [S, head_dim/2]
        emb = torch.cat((angles, angles), dim=-1)                                      # half-split layout
        image = (cell >= 0)[:, None]
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(image, emb.cos(), zero).to(dtype), torch.where(image, emb.sin(), zero).to(dtype)


class LlamaGenDecoder(Decoder):
    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        cfg = spec.extra["llamagen"]
        self.model_type = cfg["model_type"]
        if self.model_type == "c2i":
            # Code embeddings, then the class table (num_classes + 1 rows: the last is the null class).
            self.embed_tokens = nn.Embedding(spec.vocab_size + cfg["num_classes"] + 1, spec.hidden_size)
        else:
            self.cap_proj = CaptionProjection(cfg["caption_dim"], spec.hidden_size)
        self.rotary = GridRotary(spec)

    def _rope_and_mask(self, attention_mask: torch.Tensor, S: int, dtype: torch.dtype):
        B, T = attention_mask.shape
        positions = torch.arange(T, device=attention_mask.device)
        cos, sin = self.rotary(positions[T - S:], dtype)
        q_idx, k_idx = positions[T - S:, None], positions[None, :]
        allowed = ((k_idx <= q_idx)[None] & (attention_mask[:, None, :] > 0)) | (k_idx == q_idx)[None]
        zero = torch.zeros((), dtype=torch.float32)
        lowest = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
        hd = cos.shape[-1]
        return cos[None].expand(B, S, hd), sin[None].expand(B, S, hd), torch.where(allowed, zero, lowest)

    def prologue(self, input_ids, attention_mask):
        """Codes (and, for c2i, class ids V + c) -> embeddings, 2D rotary cos/sin, additive mask."""
        x = self.embed_tokens(input_ids)
        cos, sin, mask = self._rope_and_mask(attention_mask, input_ids.shape[1], x.dtype)
        return x, cos, sin, mask

    def prologue_caption(self, caption_features, attention_mask):
        """t2i prefill: caption features [B, S, caption_dim] (float32) through the caption MLP."""
        x = self.cap_proj(caption_features.to(self.cap_proj.fc1.weight.dtype))
        cos, sin, mask = self._rope_and_mask(attention_mask, caption_features.shape[1], x.dtype)
        return x, cos, sin, mask


# -- loading -----------------------------------------------------------------------------------------
def _lazy(tensor: torch.Tensor, convert=None) -> LazyTensor:
    return LazyTensor(tuple(tensor.shape), (lambda: convert(tensor)) if convert else (lambda: tensor))


def load_llamagen(path: Path, family: str, image_size: int | None = None, vq: str | None = None,
                  n_head: int | None = None, downsample: int | None = None) -> ImageCheckpoint:
    """A LlamaGen GPT `.pt` (+ optional VQ tokenizer `.pt`) -> ImageCheckpoint.

    n_head: only for dimensions that match no published config (tests); the published ones are known.
    downsample: the VQ's pixels per token when no VQ file is given (`verify` re-reads a bundle's
    source with the factor its manifest recorded); default 16, LlamaGen's VQ-16.
    """
    try:
        return _read_llamagen(path, family, image_size, vq, n_head, downsample)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing tensor {e.args[0]} (an incomplete LlamaGen checkpoint)") from None


def _read_llamagen(path: Path, family: str, image_size: int | None, vq: str | None, n_head: int | None,
                   downsample: int | None) -> ImageCheckpoint:
    model_type = family.split("-")[1]
    sd = _gpt_state_dict(path, family, model_type)
    if image_size is None:
        raise CheckpointError(f"{path}: LlamaGen needs --image-size (the size it was trained for, e.g. 256 or 384)")
    vq_source = load_vq16(Path(vq)) if vq else None
    factor = vq_source.downsample if vq_source else (downsample or 16)
    if image_size <= 0 or image_size % factor:
        raise CheckpointError(f"--image-size {image_size} is not a positive multiple of the VQ downsampling factor {factor}")
    spec = _spec(sd, model_type, image_size, factor, n_head, path)
    tensors = _canonical_tensors(sd, spec)
    _check_shapes(spec, tensors, path)
    image, arrays = _image_section(sd, spec, family)
    return ImageCheckpoint(spec=spec, tensors=tensors, source=str(path), source_format="llamagen-pt",
                           source_files=[path] + ([Path(vq)] if vq else []), family=family, image=image,
                           vq=vq_source, arrays=arrays)


def _gpt_state_dict(path: Path, family: str, model_type: str) -> dict[str, torch.Tensor]:
    """The GPT's tensors, checked to be a LlamaGen GPT of the asked type (c2i or t2i)."""
    if path.is_dir():
        raise CheckpointError(f"{path}: --family {family} expects a LlamaGen .pt file, not a folder")
    sd = training_state_dict(path, "tok_embeddings.weight")
    if "tok_embeddings.weight" not in sd or not any(k.startswith("cls_embedding.") for k in sd):
        raise CheckpointError(f"{path}: not a LlamaGen GPT checkpoint (no tok_embeddings/cls_embedding tensors)")
    found_type = "t2i" if "cls_embedding.cap_proj.fc1.weight" in sd else "c2i"
    if found_type != model_type:
        raise CheckpointError(f"{path}: a LlamaGen {found_type} checkpoint; export it with --family llamagen-{found_type}")
    return sd


def _spec(sd: dict[str, torch.Tensor], model_type: str, image_size: int, factor: int, n_head: int | None,
          path: Path) -> ModelSpec:
    """Dimensions from the tensors; the head count from the published configs unless given."""
    grid = image_size // factor
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layers = len({int(k.split(".")[1]) for k in sd if k.startswith("layers.")})
    if n_head is None:
        if dim not in GPT_CONFIGS:
            raise CheckpointError(f"{path}: hidden size {dim} matches no LlamaGen GPT config "
                                  f"({', '.join(f'{n} {d}' for d, (n, _, _) in GPT_CONFIGS.items())})")
        n_head = GPT_CONFIGS[dim][2]
    head_dim = dim // n_head
    qkv_rows = sd["layers.0.attention.wqkv.weight"].shape[0]
    n_kv = (qkv_rows - dim) // (2 * head_dim)
    ffn = sd["layers.0.feed_forward.w1.weight"].shape[0]
    prefix = 1 if model_type == "c2i" else CAPTION_TOKENS
    cfg = {"model_type": model_type, "cls_token_num": prefix, "grid": grid, "image_size": image_size,
           "downsample": factor}
    if model_type == "c2i":
        cfg["num_classes"] = sd["cls_embedding.embedding_table.weight"].shape[0] - 1
    else:
        cfg["caption_dim"] = sd["cls_embedding.cap_proj.fc1.weight"].shape[1]
    return ModelSpec(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, n_layers=n_layers, n_heads=n_head,
                     n_kv_heads=n_kv, head_dim=head_dim, rms_norm_eps=1e-5, rope_theta=ROPE_BASE,
                     max_position_embeddings=prefix + grid * grid, tie_word_embeddings=False,
                     architecture="LlamaGen", extra={"llamagen": cfg})


def _canonical_tensors(sd: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, LazyTensor]:
    """LlamaGen names -> ours: class table appended below the codes (c2i), caption MLP (t2i), fused
    q|k|v split with q/k rows permuted from interleaved pairs onto the half-split rotation."""
    dim, vocab = spec.hidden_size, spec.vocab_size
    tensors: dict[str, LazyTensor] = {"norm.weight": _lazy(sd["norm.weight"]), "lm_head.weight": _lazy(sd["output.weight"])}
    if spec.extra["llamagen"]["model_type"] == "c2i":
        codes, classes = sd["tok_embeddings.weight"], sd["cls_embedding.embedding_table.weight"]
        tensors["embed_tokens.weight"] = LazyTensor((vocab + classes.shape[0], dim), lambda: torch.cat([codes, classes]))
    else:
        tensors["embed_tokens.weight"] = _lazy(sd["tok_embeddings.weight"])
        tensors["cap_proj.fc1.weight"] = _lazy(sd["cls_embedding.cap_proj.fc1.weight"])
        tensors["cap_proj.fc2.weight"] = _lazy(sd["cls_embedding.cap_proj.fc2.weight"])
    n_head, n_kv, head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
    split = (n_head * head_dim, n_kv * head_dim, n_kv * head_dim)
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        wqkv = sd[p + "attention.wqkv.weight"]
        tensors[p + "self_attn.q_proj.weight"] = LazyTensor(
            (split[0], dim), lambda w=wqkv: unpermute_interleaved(w.split(split)[0], n_head))
        tensors[p + "self_attn.k_proj.weight"] = LazyTensor(
            (split[1], dim), lambda w=wqkv: unpermute_interleaved(w.split(split)[1], n_kv))
        tensors[p + "self_attn.v_proj.weight"] = LazyTensor((split[2], dim), lambda w=wqkv: w.split(split)[2])
        for ours, theirs in (("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
                             ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2"),
                             ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm")):
            tensors[p + ours + ".weight"] = _lazy(sd[p + theirs + ".weight"])
    return tensors


def _image_section(sd: dict[str, torch.Tensor], spec: ModelSpec, family: str) -> tuple[dict, dict[str, LazyTensor]]:
    """manifest.json's "image" section known at load time, and the arrays saved beside the graphs."""
    cfg = spec.extra["llamagen"]
    model_type, grid, image_size = cfg["model_type"], cfg["grid"], cfg["image_size"]
    image = {"family": family, "layout": "grid", "visual_tokens": {"start": 0, "count": spec.vocab_size},
             "grid": [grid, grid], "image_size": [image_size, image_size], "downsample": cfg["downsample"],
             # LlamaGen's sample_c2i.py / sample_t2i.py defaults
             "defaults": {"cfg": 4.0 if model_type == "c2i" else 7.5,
                          "visual": {"temperature": 1.0, "top_k": 2000 if model_type == "c2i" else 1000, "top_p": 1.0}}}
    arrays = {}
    if model_type == "c2i":
        image["class_conditional"] = {"num_classes": cfg["num_classes"], "token_offset": spec.vocab_size,
                                      "null_class": cfg["num_classes"]}
    else:
        image["caption"] = {"tokens": cfg["cls_token_num"], "dim": cfg["caption_dim"], "uncond_file": "uncond_caption.npy"}
        arrays["uncond_caption"] = _lazy(sd["cls_embedding.uncond_embedding"], lambda t: t.float())
    return image, arrays


def expected_extra_shapes(spec: ModelSpec) -> dict[str, tuple]:
    cfg = spec.extra["llamagen"]
    if cfg["model_type"] == "c2i":
        return {"embed_tokens.weight": (spec.vocab_size + cfg["num_classes"] + 1, spec.hidden_size)}
    return {"cap_proj.fc1.weight": (spec.hidden_size, cfg["caption_dim"]),
            "cap_proj.fc2.weight": (spec.hidden_size, spec.hidden_size)}


def _check_shapes(spec: ModelSpec, tensors: dict[str, LazyTensor], path: Path) -> None:
    expected = {**expected_shapes(spec), **expected_extra_shapes(spec)}
    wrong = [f"{n} has shape {list(tensors[n].shape)}, expected {list(s)}"
             for n, s in expected.items() if n in tensors and tuple(tensors[n].shape) != tuple(s)]
    missing = [n for n in expected if n not in tensors]
    if wrong or missing:
        raise CheckpointError(f"{path}: " + "; ".join(wrong + [f"missing {m}" for m in missing[:5]]))
