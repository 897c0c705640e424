"""Hugging Face checkpoint folders: config.json + model.safetensors (or a sharded index) + tokenizer files."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors import safe_open

from ..checkpoint import Checkpoint, LazyTensor, check_tensors
from ..errors import CheckpointError
from ..spec import ModelSpec

# Architectures whose decoder is exactly our module (Qwen3 adds per-head q/k RMSNorm).
SUPPORTED = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}


def read_json(path: Path) -> dict:
    """A JSON object from `path`; anything else (bad JSON, a list, binary) is a CheckpointError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def rope_scaling_from_config(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from either the classic keys or transformers 5's `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        return theta, {"type": "llama3", "factor": float(scaling["factor"]),
                       "low_freq_factor": float(scaling["low_freq_factor"]),
                       "high_freq_factor": float(scaling["high_freq_factor"]),
                       "original_max_position_embeddings": int(scaling["original_max_position_embeddings"])}
    raise CheckpointError(f"rope scaling type {kind!r} is not supported (supported: linear, llama3)")


def spec_from_config(cfg: dict, source: str) -> ModelSpec:
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise CheckpointError(f"{source}: architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    theta, scaling = rope_scaling_from_config(cfg)
    heads = int(cfg["num_attention_heads"])
    try:
        return ModelSpec(
            vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]), n_layers=int(cfg["num_hidden_layers"]),
            n_heads=heads, n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            # Llama's attention_bias also puts a bias on o_proj; Qwen3's does not.
            attention_out_bias=bool(cfg.get("attention_bias", False)) and SUPPORTED[arch] == "llama",
            qk_norm=SUPPORTED[arch] == "qwen3", architecture=arch)
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json lacks {e.args[0]!r}") from None


def _safetensors_header_check(path: Path) -> None:
    """A truncated file must fail here, by name, not later inside a tensor read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object of tensors with "
                                  f"data_offsets)") from None
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file (needs {8 + n + end} bytes, has {size})")


def _lazy(path: Path, name: str, shape) -> LazyTensor:
    def load():
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    return LazyTensor(tuple(shape), load)


def safetensors_tensors(folder: Path) -> tuple[dict[str, LazyTensor], list[Path]]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / f for f in read_json(index)["weight_map"].values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) named in the index are missing: {', '.join(missing)}")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no weights found (expected model.safetensors or a sharded index)")
    tensors = {}
    for path in files:
        _safetensors_header_check(path)
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = _lazy(path, name, f.get_slice(name).get_shape())
    return tensors, files


def special_tokens(folder: Path, cfg: dict, tokenizer_json: str | None) -> tuple[dict, dict]:
    gen = read_json(folder / "generation_config.json") if (folder / "generation_config.json").exists() else {}
    def ids(v):
        return None if v is None else ([int(x) for x in v] if isinstance(v, list) else [int(v)])
    eos = ids(gen.get("eos_token_id", cfg.get("eos_token_id")))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    tok_cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    if tokenizer_json and (eos is None or bos is None):
        vocab = {t["content"]: t["id"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
        tok = lambda v: vocab.get(v if isinstance(v, str) else (v or {}).get("content"))
        eos = eos or ids(tok(tok_cfg.get("eos_token")))
        bos = bos if bos is not None else tok(tok_cfg.get("bos_token"))
    defaults = {k: gen[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "do_sample",
                                    "max_new_tokens") if k in gen}
    return {"bos_token_id": bos, "eos_token_id": eos or [], "pad_token_id": pad}, defaults


def load_hf(folder: Path) -> Checkpoint:
    cfg_path = folder / "config.json"
    cfg = read_json(cfg_path)
    spec = spec_from_config(cfg, str(cfg_path))
    raw, files = safetensors_tensors(folder)
    tensors = {k.removeprefix("model."): v for k, v in raw.items()}
    if spec.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tensors = {k: v for k, v in tensors.items() if "rotary_emb" not in k}
    check_tensors(spec, tensors, str(folder), name_of=lambda n: n if n == "lm_head.weight" else "model." + n)
    tok_path = folder / "tokenizer.json"
    tokenizer_json = tok_path.read_text(encoding="utf-8") if tok_path.exists() else None
    warnings = []
    if tokenizer_json is None and (folder / "tokenizer.model").exists():
        # SentencePiece only (e.g. Chinese-LLaMA-2 releases): convert it.
        from ..tokenizer_convert import from_tokenizer_model
        try:
            tokenizer_json, _ = from_tokenizer_model(folder / "tokenizer.model")
        except CheckpointError as e:
            warnings.append(str(e))
    tok_cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    template = tok_cfg.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(template, list):   # named templates: keep the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    specials, defaults = special_tokens(folder, cfg, tokenizer_json)
    ckpt = Checkpoint(spec=spec, tensors=tensors, source=str(folder), source_format="hf", source_files=files,
                      tokenizer_json=tokenizer_json, chat_template=template, special_tokens=specials,
                      generation_defaults=defaults, family=SUPPORTED[spec.architecture], warnings=warnings)
    if tokenizer_json is None:
        ckpt.warnings.append("no tokenizer.json: the bundle takes token ids only (--prompt-ids)")
    return ckpt
