"""Hugging Face checkpoint folders: config.json + model.safetensors (or a sharded index) + tokenizer files."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from safetensors import safe_open

from ..checkpoint import Checkpoint, LazyTensor, check_tensors
from ..errors import CheckpointError
from ...runtime.paths import inside
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


def config_number(cfg: dict, key: str, source: str, default=None, kind=int):
    """cfg[key] as an int (or float), refused naming `source` and the key when it is missing (and no
    default is given) or not a number of that kind."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise CheckpointError(f"{source}: config.json lacks {key!r}")
        return default
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not whole) \
            or value != value or value in (float("inf"), float("-inf")):
        raise CheckpointError(f"{source}: {key} must be {'an integer' if kind is int else 'a number'} (got {value!r})")
    return kind(value)


def spec_from_config(cfg: dict, source: str) -> ModelSpec:
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise CheckpointError(f"{source}: architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported")
    try:
        theta, scaling = rope_scaling_from_config(cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{source}: rope scaling settings unreadable ({type(e).__name__}: {e})") from None
    number = lambda key, default=None, kind=int: config_number(cfg, key, source, default, kind)  # noqa: E731
    heads, hidden = number("num_attention_heads"), number("hidden_size")
    try:
        return _spec(cfg, arch, number, heads, hidden, theta, scaling)
    except CheckpointError as e:                   # "invalid model spec: ...": name the file
        raise CheckpointError(f"{source}: {e}") from None


def _spec(cfg: dict, arch: str, number, heads: int, hidden: int, theta: float, scaling) -> ModelSpec:
    return ModelSpec(
        vocab_size=number("vocab_size"), hidden_size=hidden, intermediate_size=number("intermediate_size"),
        n_layers=number("num_hidden_layers"), n_heads=heads, n_kv_heads=number("num_key_value_heads", heads),
        head_dim=number("head_dim", hidden // heads if heads > 0 else 0),
        rms_norm_eps=number("rms_norm_eps", 1e-6, float), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=number("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        # Llama's attention_bias also puts a bias on o_proj; Qwen3's does not.
        attention_out_bias=bool(cfg.get("attention_bias", False)) and SUPPORTED[arch] == "llama",
        qk_norm=SUPPORTED[arch] == "qwen3", architecture=arch)


# Bytes per element of each safetensors dtype.
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _safetensors_header_check(path: Path) -> None:
    """A truncated file, or a header whose tensors do not fit the file, must fail here, by name, not
    later inside a tensor read (or an allocation of the size a damaged shape claims)."""
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
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
        except (ValueError, UnicodeDecodeError, AttributeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object of tensors)") from None
    data_bytes = size - 8 - n
    for name, entry in entries.items():
        if problem := _tensor_entry_problem(entry, data_bytes):
            raise CheckpointError(f"{path}: tensor {name!r}: {problem}")


def _tensor_entry_problem(entry, data_bytes: int) -> str | None:
    """What is wrong with one header entry (dtype, shape, data_offsets), or None."""
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_ITEMSIZE:
        return f"unknown or missing dtype {entry.get('dtype') if isinstance(entry, dict) else entry!r}"
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return f"shape {shape!r} is not a list of sizes"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r} are not [begin, end]"
    if offsets[1] > data_bytes:
        return f"truncated safetensors file (its data ends at byte {offsets[1]}, the file holds {data_bytes})"
    declared = SAFETENSORS_ITEMSIZE[entry["dtype"]]
    for d in shape:
        declared *= d
    if declared != offsets[1] - offsets[0]:
        return (f"shape {shape} of {entry['dtype']} needs {declared} bytes, but data_offsets give "
                f"{offsets[1] - offsets[0]}")
    return None


def _lazy(path: Path, name: str, shape) -> LazyTensor:
    def load():
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    return LazyTensor(tuple(shape), load)


def safetensors_tensors(folder: Path) -> tuple[dict[str, LazyTensor], list[Path]]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({inside(folder, f, f"{index}: weight_map", CheckpointError) for f in _weight_map(index)})
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


def _weight_map(index: Path) -> list[str]:
    """The shard file names of a sharded checkpoint's index (weight_map: tensor name -> file name)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> shard file name "
                              f"(got {type(weight_map).__name__})")
    return sorted(set(weight_map.values()))


def token_ids(value, key: str, source: Path) -> list[int] | None:
    """An id or a list of ids (eos_token_id may be either) as a list; anything else is refused."""
    ids = value if isinstance(value, list) else [value]
    if value is None:
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in ids):
        raise CheckpointError(f"{source}: {key} must be a token id or a list of token ids (got {value!r})")
    return list(ids)


def _added_tokens(tokenizer_json: str) -> dict:
    """content -> id of a tokenizer.json's added tokens (none when the file is not what tokenizers writes)."""
    try:
        return {t["content"]: t["id"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}


def special_tokens(folder: Path, cfg: dict, tokenizer_json: str | None) -> tuple[dict, dict]:
    gen_path = folder / "generation_config.json"
    gen = read_json(gen_path) if gen_path.exists() else {}
    def ids(key):
        return token_ids(gen.get(key, cfg.get(key)), key, gen_path if key in gen else folder / "config.json")
    eos = ids("eos_token_id")
    bos, pad = [(v or [None])[0] for v in (ids("bos_token_id"), ids("pad_token_id"))]
    tok_cfg = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").exists() else {}
    if tokenizer_json and (eos is None or bos is None):
        vocab = _added_tokens(tokenizer_json)
        tok = lambda v: vocab.get(v if isinstance(v, str) else v.get("content") if isinstance(v, dict) else None)
        eos = eos or token_ids(tok(tok_cfg.get("eos_token")), "eos_token", folder / "tokenizer_config.json")
        bos = bos if bos is not None else tok(tok_cfg.get("bos_token"))
    defaults = {k: gen[k] for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "do_sample",
                                    "max_new_tokens") if k in gen}
    return {"bos_token_id": bos, "eos_token_id": eos or [], "pad_token_id": pad}, defaults


def chat_template(template, source: Path) -> str | None:
    """The chat template: a string, or the default one of a list of named ones; anything else is refused."""
    if isinstance(template, list):   # named templates: keep the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{source}: chat_template must be a Jinja template string (got {type(template).__name__})")
    return template


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
    template = chat_template(template, folder / "tokenizer_config.json")
    specials, defaults = special_tokens(folder, cfg, tokenizer_json)
    ckpt = Checkpoint(spec=spec, tensors=tensors, source=str(folder), source_format="hf", source_files=files,
                      tokenizer_json=tokenizer_json, chat_template=template, special_tokens=specials,
                      generation_defaults=defaults, family=SUPPORTED[spec.architecture], warnings=warnings)
    if tokenizer_json is None:
        ckpt.warnings.append("no tokenizer.json: the bundle takes token ids only (--prompt-ids)")
    return ckpt
