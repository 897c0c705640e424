"""Meta-style folders: params.json + consolidated.*.pth (+ tokenizer.model).

Meta's code rotates interleaved (real, imaginary) pairs; our modules rotate halves like Hugging Face,
so wq/wk rows are permuted per head on load (an exact re-ordering, see `unpermute_interleaved`).
Model-parallel shards (consolidated.00.pth, .01.pth, ...) are merged lazily: every shard is mapped
(torch.load with mmap, nothing read), and each tensor's load reads its slices from the shards and
concatenates them along the axis it was split on, so an export holds one tensor at a time in its own
memory (plus the mapped pages of the slices being copied, which the kernel may drop).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, LazyTensor, check_tensors, unpermute_interleaved
from ..errors import CheckpointError
from ..spec import ModelSpec
from ..torch_files import load_tensor_dict

# Meta name -> canonical name; {i} is the layer index.
NAMES = {
    "tok_embeddings.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention_norm.weight": "layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.attention.wq.weight": "layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "layers.{i}.mlp.down_proj.weight",
}
# Axis along which model-parallel shards split each tensor (None: replicated).
SHARD_AXIS = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def _axis(meta_name: str):
    for part in meta_name.split("."):
        if part in SHARD_AXIS:
            return SHARD_AXIS[part]
    return None


def _to_canonical(meta_name: str) -> str | None:
    parts = meta_name.split(".")
    if parts[0] == "layers" and len(parts) > 2:
        key = "layers.{i}." + ".".join(parts[2:])
        return NAMES[key].replace("{i}", parts[1]) if key in NAMES else None
    return NAMES.get(meta_name)


def load_meta(folder: Path) -> Checkpoint:
    params_path = folder / "params.json"
    try:
        params = json.loads(params_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{params_path}: not valid JSON ({e})") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{params_path}: expected a JSON object of model settings, not {type(params).__name__}")
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: no weights found (expected consolidated.*.pth beside params.json)")
    raw = merge_shards([load_tensor_dict(f) for f in files], files)
    spec = _spec_from_params(params, raw, params_path)
    tensors, meta_name_of = _canonical_tensors(raw, spec)
    check_tensors(spec, tensors, str(folder), name_of=lambda canon: meta_name_of.get(canon) or _meta_name(canon))
    ckpt = Checkpoint(spec=spec, tensors=tensors, source=str(folder), source_format="meta", source_files=files,
                      family="llama")
    _attach_tokenizer(ckpt, folder / "tokenizer.model")
    return ckpt


def merge_shards(shards: list[dict[str, torch.Tensor]], files: list[Path]) -> dict[str, LazyTensor]:
    """Model-parallel shards (mapped, unread) -> one LazyTensor per Meta name whose load concatenates
    that tensor's slices along the axis it was split on (replicated tensors: the first shard's)."""
    names = [name for name in shards[0] if not name.endswith("rope.freqs")]
    for shard, path in zip(shards[1:], files[1:]):
        missing = [name for name in names if name not in shard]
        extra = [name for name in shard if name not in shards[0] and not name.endswith("rope.freqs")]
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which {files[0].name} has not"
            raise CheckpointError(f"{path}: {what} (every model-parallel shard holds a slice of the same tensors)")
    merged = {}
    for name in names:
        parts = [shard[name] for shard in shards]
        axis = _axis(name) if len(parts) > 1 else None
        merged[name] = LazyTensor(_merged_shape(name, parts, axis, files), _concatenation(parts, axis))
    return merged


def _merged_shape(name: str, parts: list[torch.Tensor], axis: int | None, files: list[Path]) -> tuple[int, ...]:
    """The shape of the whole tensor; every shard's slice must agree on the other axes (and dtype)."""
    first = parts[0]
    for part, path in zip(parts[1:], files[1:]):
        same = part.dim() == first.dim() and all(
            a == b for k, (a, b) in enumerate(zip(part.shape, first.shape)) if k != axis)
        if not same or part.dtype != first.dtype:
            how = "split on axis " + str(axis) if axis is not None else "replicated"
            raise CheckpointError(f"{path}: {name} is {list(part.shape)} {part.dtype}, but {files[0].name} has "
                                  f"{list(first.shape)} {first.dtype} ({how} across shards)")
    if axis is None:
        return tuple(first.shape)
    if first.dim() <= axis:
        raise CheckpointError(f"{files[0]}: {name} has shape {list(first.shape)}, expected a split axis {axis}")
    shape = list(first.shape)
    shape[axis] = sum(part.shape[axis] for part in parts)
    return tuple(shape)


def _concatenation(parts: list[torch.Tensor], axis: int | None):
    if axis is None:
        return lambda: parts[0]
    return lambda: torch.cat(parts, dim=axis)


def _spec_from_params(params: dict, raw: dict[str, LazyTensor], params_path: Path) -> ModelSpec:
    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        n_kv = int(params.get("n_kv_heads") or n_heads)
        vocab = raw["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in raw else int(params["vocab_size"])
        ffn = raw["layers.0.feed_forward.w1.weight"].shape[0] if "layers.0.feed_forward.w1.weight" in raw else 0
        scaling = None
        if params.get("use_scaled_rope"):
            # Llama 3.1+: the published scaled-RoPE constants of Meta's reference code.
            scaling = {"type": "llama3", "factor": float(params.get("rope_scaling_factor", 8.0)),
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
        return ModelSpec(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, n_layers=int(params["n_layers"]),
                         n_heads=n_heads, n_kv_heads=n_kv, head_dim=dim // n_heads,
                         rms_norm_eps=float(params.get("norm_eps", 1e-5)),
                         rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling,
                         max_position_embeddings=int(params.get("max_seq_len", 4096)),
                         tie_word_embeddings="output.weight" not in raw)
    except KeyError as e:
        raise CheckpointError(f"{params_path}: lacks {e.args[0]!r}") from None
    except (TypeError, ValueError, ArithmeticError) as e:   # a setting that is not a number (or an impossible spec)
        raise CheckpointError(f"{params_path}: {e}") from None


def _canonical_tensors(raw: dict[str, LazyTensor], spec: ModelSpec) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Meta tensors under canonical names (wq/wk rows permuted onto the half-split rotation), and
    canonical name -> Meta name for error messages."""
    tensors: dict[str, LazyTensor] = {}
    meta_name_of = {}
    for name, tensor in raw.items():
        canon = _to_canonical(name)
        if canon is None:
            continue
        meta_name_of[canon] = name
        if name.endswith("attention.wq.weight") or name.endswith("attention.wk.weight"):
            heads = spec.n_heads if ".wq." in name else spec.n_kv_heads
            tensors[canon] = LazyTensor(tensor.shape, lambda t=tensor, h=heads: unpermute_interleaved(t.load(), h))
        else:
            tensors[canon] = tensor
    return tensors, meta_name_of


def _meta_name(canon: str) -> str:
    """The Meta name a missing canonical tensor would have had."""
    reverse = {v: k for k, v in NAMES.items()}
    parts = canon.split(".")
    if parts[0] == "layers":
        return reverse.get("layers.{i}." + ".".join(parts[2:]), canon).replace("{i}", parts[1])
    return reverse.get(canon, canon)


def _attach_tokenizer(ckpt: Checkpoint, tokenizer_model: Path) -> None:
    if not tokenizer_model.exists():
        ckpt.warnings.append("no tokenizer.model: the bundle takes token ids only (--prompt-ids)")
        return
    from ..tokenizer_convert import from_tokenizer_model
    try:
        ckpt.tokenizer_json, ckpt.special_tokens = from_tokenizer_model(tokenizer_model)
    except CheckpointError as e:
        ckpt.warnings.append(f"{e}; the bundle takes token ids only (--prompt-ids)")
