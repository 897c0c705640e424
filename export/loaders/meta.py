"""Meta-style folders: params.json + consolidated.*.pth (+ tokenizer.model).

Meta's code rotates interleaved (real, imaginary) pairs; our modules rotate halves like Hugging Face,
so wq/wk rows are permuted per head on load (an exact re-ordering, see `unpermute_interleaved`).
Model-parallel shards (consolidated.00.pth, .01.pth, ...) are concatenated along the axis each
tensor was split on.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, CheckpointError, LazyTensor, check_tensors, unpermute_interleaved
from ..spec import ModelSpec

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


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: never unpickle arbitrary objects; mmap: tensors are read when touched.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused to load: it holds a Python object{what}, not only tensors") from None
    except Exception as e:   # truncated or not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {first})") from None


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
        params = json.loads(params_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{params_path}: not valid JSON ({e})") from None
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: no weights found (expected consolidated.*.pth beside params.json)")
    shards = [_load_shard(f) for f in files]

    raw: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        if name.endswith("rope.freqs"):
            continue
        parts = [s[name] for s in shards]
        axis = _axis(name) if len(parts) > 1 else None
        raw[name] = torch.cat(parts, dim=axis) if axis is not None else parts[0]

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
        spec = ModelSpec(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, n_layers=int(params["n_layers"]),
                         n_heads=n_heads, n_kv_heads=n_kv, head_dim=dim // n_heads,
                         rms_norm_eps=float(params.get("norm_eps", 1e-5)),
                         rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling,
                         max_position_embeddings=int(params.get("max_seq_len", 4096)),
                         tie_word_embeddings="output.weight" not in raw)
    except KeyError as e:
        raise CheckpointError(f"{params_path}: lacks {e.args[0]!r}") from None

    tensors: dict[str, LazyTensor] = {}
    meta_name_of = {}
    for name, t in raw.items():
        canon = _to_canonical(name)
        if canon is None:
            continue
        meta_name_of[canon] = name
        if name.endswith("attention.wq.weight") or name.endswith("attention.wk.weight"):
            heads = n_heads if ".wq." in name else n_kv
            tensors[canon] = LazyTensor(tuple(t.shape), lambda t=t, h=heads: unpermute_interleaved(t, h))
        else:
            tensors[canon] = LazyTensor(tuple(t.shape), lambda t=t: t)
    reverse = {v: k for k, v in NAMES.items()}

    def meta_name(canon: str) -> str:
        if canon in meta_name_of:
            return meta_name_of[canon]
        parts = canon.split(".")
        if parts[0] == "layers":
            return reverse.get("layers.{i}." + ".".join(parts[2:]), canon).replace("{i}", parts[1])
        return reverse.get(canon, canon)

    check_tensors(spec, tensors, str(folder), name_of=meta_name)
    ckpt = Checkpoint(spec=spec, tensors=tensors, source=str(folder), source_format="meta", source_files=files,
                      family="llama")
    tok = folder / "tokenizer.model"
    if tok.exists():
        from ..tokenizer_convert import from_tokenizer_model
        try:
            ckpt.tokenizer_json, ckpt.special_tokens = from_tokenizer_model(tok)
        except CheckpointError as e:
            ckpt.warnings.append(f"{e}; the bundle takes token ids only (--prompt-ids)")
    else:
        ckpt.warnings.append("no tokenizer.model: the bundle takes token ids only (--prompt-ids)")
    return ckpt
