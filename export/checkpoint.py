"""What every loader returns: a ModelSpec, lazily loaded tensors under canonical names, tokenizer facts.

Tensors are loaded one at a time (`LazyTensor.load()`), so writing a bundle never holds a whole model
in memory; only `verify` builds the full PyTorch reference.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..runtime.files import hash_file_into
from .errors import CheckpointError  # noqa: F401  (re-exported for loaders)
from .spec import ModelSpec


@dataclass
class LazyTensor:
    shape: tuple[int, ...]
    loader: Callable[[], torch.Tensor]

    def load(self) -> torch.Tensor:
        return self.loader()


@dataclass
class Checkpoint:
    spec: ModelSpec
    tensors: dict[str, LazyTensor]
    source: str
    source_format: str                       # "hf" | "meta" | "gguf"
    source_files: list[Path] = field(default_factory=list)
    tokenizer_json: str | None = None        # serialized `tokenizers` JSON, when the checkpoint has one
    chat_template: str | None = None
    special_tokens: dict = field(default_factory=dict)   # bos_token_id, eos_token_id (list), pad_token_id
    generation_defaults: dict = field(default_factory=dict)
    family: str = "llama"
    warnings: list[str] = field(default_factory=list)

    def source_sha256(self) -> str:
        """Hash of the weight files (names and bytes), so a bundle says exactly what it came from."""
        h = hashlib.sha256()
        for path in sorted(self.source_files):
            h.update(path.name.encode())
            hash_file_into(h, path)
        return h.hexdigest()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.load() for name, t in self.tensors.items()}


# Projections that read the same input are stored and run as one: q|k|v and gate|up. Loaders keep the
# checkpoint's separate tensors; the decoder's modules (and so every graph) use the fused ones.
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


def fused_parts(name: str) -> list[str] | None:
    """`layers.3.self_attn.qkv_proj.weight` -> the three tensors it concatenates (None: not fused)."""
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            return [name.replace(fused, part) for part in parts]
    return None


def load_model_tensor(tensors: dict[str, LazyTensor], name: str) -> torch.Tensor:
    """A tensor under the decoder's name: a checkpoint tensor, or the concatenation (along the output
    rows) of the ones a fused projection stands for."""
    parts = fused_parts(name)
    if parts is None:
        return tensors[name].load()
    return torch.cat([tensors[part].load() for part in parts], 0)


def fuse_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with separate q/k/v and gate/up tensors -> the decoder's fused names."""
    fused, used = {}, set()
    for name in state:
        for whole, parts in FUSED.items():
            if f".{parts[0]}." in name:
                members = [name.replace(parts[0], part) for part in parts]
                fused[name.replace(parts[0], whole)] = torch.cat([state[m] for m in members], 0)
                used.update(members)
    return {**{n: t for n, t in state.items() if n not in used}, **fused}


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names (Hugging Face Llama layout, no `model.` prefix) and their shapes."""
    d, f, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q, kv = spec.n_heads * hd, spec.n_kv_heads * hd
    shapes = {"embed_tokens.weight": (spec.vocab_size, d), "norm.weight": (d,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, d)
    for i in range(spec.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
        if spec.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if spec.attention_out_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if spec.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
    return shapes


def check_tensors(spec: ModelSpec, tensors: dict[str, LazyTensor], source: str, name_of=lambda n: n) -> None:
    """Fail with one message naming every missing or mis-shaped tensor (in the checkpoint's own names)."""
    expected = expected_shapes(spec)
    missing = [name_of(n) for n in expected if n not in tensors]
    wrong = [f"{name_of(n)} has shape {list(tensors[n].shape)}, expected {list(s)}"
             for n, s in expected.items() if n in tensors and tuple(tensors[n].shape) != s]
    unexpected = [name_of(n) for n in tensors if n not in expected]
    problems = []
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        problems.append(f"unexpected tensor(s) {shown} (not part of {spec.architecture} as configured)")
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        problems.append(f"missing tensor(s) {shown}")
    problems += wrong
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def unpermute_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q/k rotating interleaved pairs (Meta, GGUF) -> rows rotating the two halves (Hugging Face).

    Per head, interleaved row 2j pairs with 2j+1; the half-split layout pairs row j with j + hd/2.
    Taking the even rows first, then the odd rows, maps one onto the other exactly (a permutation).
    """
    rows, cols = w.shape[0], w.shape[1:]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *cols).transpose(1, 2).reshape(rows, *cols)


def permute_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `unpermute_interleaved` (used to write Meta-format test checkpoints)."""
    rows, cols = w.shape[0], w.shape[1:]
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, *cols).transpose(1, 2).reshape(rows, *cols)
