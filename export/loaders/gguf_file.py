"""llama-architecture GGUF files (llama.cpp's format), dequantized to float with the `gguf` package.

llama.cpp's converter permutes q/k rows of `llama` models into the interleaved-pair rotation;
we undo that permutation on load. The tokenizer is rebuilt from the GGUF metadata.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint, LazyTensor, check_tensors, unpermute_interleaved
from ..errors import CheckpointError
from ..spec import ModelSpec

SUPPORTED_ARCH = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
NAMES = {
    "token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}


def _canonical(name: str) -> str | None:
    if name.startswith("blk."):
        _, i, rest = name.split(".", 2)
        return f"layers.{i}.{NAMES[rest]}" if rest in NAMES else None
    return NAMES.get(name)


def field(reader, key, default=None):
    """A metadata value of the GGUF file, or `default` when it has none."""
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def load_gguf(path: Path) -> Checkpoint:
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read as GGUF ({type(e).__name__}: {e})") from None
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCH:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCH)})")
    tensors_by_name = {t.name: t for t in reader.tensors}
    spec = _spec_from_metadata(reader, arch, tensors_by_name, path)
    if "rope_freqs.weight" in tensors_by_name:
        # llama3-style scaling baked into per-frequency factors; we only support the metadata forms.
        raise CheckpointError(f"{path}: rope_freqs (baked llama3 rope scaling) is not supported yet")
    tensors = _canonical_tensors(reader, spec, permute_rope_rows=arch == "llama")
    check_tensors(spec, tensors, str(path))

    from ..tokenizer_convert import from_gguf
    tok_json, specials = from_gguf(reader)
    return Checkpoint(spec=spec, tensors=tensors, source=str(path), source_format="gguf", source_files=[path],
                      tokenizer_json=tok_json, chat_template=field(reader, "tokenizer.chat_template"),
                      special_tokens=specials, generation_defaults={}, family=arch)


def _spec_from_metadata(reader, arch: str, tensors_by_name: dict, path: Path) -> ModelSpec:
    def meta(key, default=None):
        return field(reader, f"{arch}.{key}", default)
    try:
        n_heads = int(meta("attention.head_count"))
        hidden = int(meta("embedding_length"))
        emb = tensors_by_name["token_embd.weight"]
        vocab = int(emb.shape[-1]) if len(emb.shape) > 1 else int(meta("vocab_size"))
        scaling = None
        scale_type = meta("rope.scaling.type")
        if scale_type == "linear":
            scaling = {"type": "linear", "factor": float(meta("rope.scaling.factor"))}
        elif scale_type not in (None, "none"):
            raise CheckpointError(f"{path}: rope scaling {scale_type!r} is not supported")
        return ModelSpec(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=int(meta("feed_forward_length")),
            n_layers=int(meta("block_count")), n_heads=n_heads, n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
            head_dim=int(meta("attention.key_length", hidden // n_heads)),
            rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta("rope.freq_base", 10000.0)), rope_scaling=scaling,
            max_position_embeddings=int(meta("context_length", 4096)),
            tie_word_embeddings="output.weight" not in tensors_by_name,
            attention_bias="blk.0.attn_q.bias" in tensors_by_name,
            attention_out_bias="blk.0.attn_output.bias" in tensors_by_name,
            qk_norm=arch == "qwen3", architecture=SUPPORTED_ARCH[arch])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: GGUF metadata or tensor missing: {e}") from None
    except (ValueError, ArithmeticError) as e:      # a setting that is not a number (CheckpointError: the spec's)
        raise CheckpointError(f"{path}: {e}") from None


def _canonical_tensors(reader, spec: ModelSpec, permute_rope_rows: bool) -> dict[str, LazyTensor]:
    """Lazily dequantized float32 tensors under canonical names. llama.cpp's converter permutes the
    q/k rows of `llama` models onto interleaved pairs; permute_rope_rows undoes that."""
    from gguf import quants
    tensors: dict[str, LazyTensor] = {}
    for entry in reader.tensors:
        canon = _canonical(entry.name)
        if canon is None:
            continue
        shape = tuple(int(x) for x in reversed(entry.shape.tolist()))  # GGUF lists dims fastest-first
        permute = permute_rope_rows and (canon.endswith("q_proj.weight") or canon.endswith("k_proj.weight"))
        heads = spec.n_heads if "q_proj" in canon else spec.n_kv_heads

        def load(entry=entry, shape=shape, permute=permute, heads=heads):
            arr = quants.dequantize(entry.data, entry.tensor_type).reshape(shape)
            w = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))   # writable copy; the file stays mapped read-only
            return unpermute_interleaved(w, heads) if permute else w
        tensors[canon] = LazyTensor(shape, load)
    return tensors
