"""Emu3 (Hugging Face `Emu3ForConditionalGeneration` folders) and Emu3.5-style checkpoints.

Emu3's language model is plain Llama and Emu3.5's is numerically Qwen3 (per-head q/k RMSNorm), so
both export through our unchanged decoder; what this module adds is the image layout read from the
vocabulary (visual-token id range, BOI/IMG/EOL/EOF/EOI, the digit tokens of the "H*W" header) and,
for Emu3, the VQ decoder taken from the same checkpoint.

Layouts (token strings of the released tokenizers):
    prompt ... BOI "H*W" IMG  row_0 EOL row_1 EOL ... row_{H-1} EOL  EOF EOI      (emu3)
    prompt ... BOI "H*W" IMG  row_0 EOL row_1 EOL ... row_{H-1}          EOI      (emu3.5)
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from ..checkpoint import LazyTensor, check_tensors
from ..errors import CheckpointError
from ..loaders.hf import load_hf, read_json, safetensors_tensors, spec_from_config
from . import ImageCheckpoint
from .vq import emu3_vq_source

SPECIAL = {"boi": "<|image start|>", "img": "<|image token|>", "eoi": "<|image end|>", "eol": "<|extra_200|>",
           "eof": "<|extra_201|>", "bos": "<|extra_203|>", "eos": "<|extra_204|>", "pad": "<|endoftext|>"}
VISUAL = re.compile(r"^<\|visual token (\d+)\|>$")
HEADER_CHARS = "0123456789*"


def image_layout(vocab: dict[str, int], family: str, source: str) -> dict:
    """The manifest's image fields from a token-string -> id map."""
    codes = {int(m.group(1)): i for s, i in vocab.items() if (m := VISUAL.match(s))}
    if not codes:
        raise CheckpointError(f"{source}: no '<|visual token NNNNNN|>' entries in the vocabulary: not an {family} checkpoint")
    start, count = codes[min(codes)], len(codes)
    if min(codes) != 0 or any(codes.get(c) != start + c for c in range(count)):
        raise CheckpointError(f"{source}: visual tokens are not one contiguous id range in code order")
    special = {k: vocab.get(s) for k, s in SPECIAL.items()}
    needed = ["boi", "img", "eoi", "eol"] + (["eof"] if family == "emu3" else [])
    missing = [SPECIAL[k] for k in needed if special[k] is None]
    header = {c: vocab.get(c) for c in HEADER_CHARS}
    missing += [repr(c) for c, i in header.items() if i is None]
    if missing:
        raise CheckpointError(f"{source}: the vocabulary lacks {', '.join(missing)}")
    if family == "emu3.5":
        special["eof"] = None    # Emu3.5 ends an image with EOI right after the last row
    return {"family": family, "layout": family, "visual_tokens": {"start": start, "count": count},
            "special": special, "header_ids": header, "uncond_prompt": "",
            # Emu3's processor targets a 720x720 area (90x90 tokens); Emu3.5's T2I config 1024x1024 (64x64).
            "default_size": [720, 720] if family == "emu3" else [1024, 1024],
            # Emu3's image_generation.py samples with top_k 2048 and CFG 3.0; Emu3.5's T2I config uses
            # cfg 5.0, image top_k 5120 / top_p 1.0 and text top_k 1024 / top_p 0.9 (differential sampling).
            "defaults": ({"cfg": 3.0, "visual": {"temperature": 1.0, "top_k": 2048, "top_p": 1.0},
                          "text": {"temperature": 1.0, "top_k": 2048, "top_p": 1.0}} if family == "emu3" else
                         {"cfg": 5.0, "visual": {"temperature": 1.0, "top_k": 5120, "top_p": 1.0},
                          "text": {"temperature": 1.0, "top_k": 1024, "top_p": 0.9}})}


def _tokenizer_vocab(tokenizer_json: str | None) -> dict[str, int]:
    if not tokenizer_json:
        return {}
    tok = json.loads(tokenizer_json)
    model_vocab = (tok.get("model") or {}).get("vocab")
    vocab = dict(model_vocab) if isinstance(model_vocab, dict) else {}     # BPE / WordLevel; Unigram has a list
    vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens", [])})
    return vocab


def _folder_parts(folder: Path):
    cfg_path = folder / "config.json"
    if not folder.is_dir() or not cfg_path.exists():
        raise CheckpointError(f"{folder}: expected a Hugging Face checkpoint folder (config.json + safetensors)")
    tok_path = folder / "tokenizer.json"
    tokenizer_json = tok_path.read_text(encoding="utf-8") if tok_path.exists() else None
    return read_json(cfg_path), tokenizer_json


def is_emu3_folder(folder: Path) -> bool:
    """A Hugging Face folder whose config names the unified Emu3 model (the files alone say so)."""
    if not (folder / "config.json").exists():
        return False
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False     # load_hf names the broken file
    return isinstance(cfg, dict) and "Emu3ForConditionalGeneration" in (cfg.get("architectures") or [])


def load_emu3(folder: Path) -> ImageCheckpoint:
    """`Emu3ForConditionalGeneration` folder: Llama LM (text_model) + VQ-VAE (vqmodel) + vocabulary_map."""
    cfg, tokenizer_json = _folder_parts(folder)
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch != "Emu3ForConditionalGeneration":
        raise CheckpointError(f"{folder}: architecture {arch!r} is not an Emu3 checkpoint (Emu3ForConditionalGeneration)")
    text_cfg = dict(cfg.get("text_config") or {})
    spec = spec_from_config({**text_cfg, "architectures": ["LlamaForCausalLM"]}, str(folder / "config.json"))
    spec = dataclasses.replace(spec, architecture="Emu3ForConditionalGeneration")
    raw, files = safetensors_tensors(folder)
    text, vq = _split_unified_tensors(raw)
    check_tensors(spec, text, str(folder), name_of=lambda n: n if n == "lm_head.weight" else "text_model.model." + n)
    vocab = {**_tokenizer_vocab(tokenizer_json), **(cfg.get("vocabulary_map") or {})}
    image = image_layout(vocab, "emu3", str(folder))
    vq_source = emu3_vq_source(cfg.get("vq_config") or {}, vq, str(folder))
    image["downsample"] = vq_source.downsample
    specials = image["special"]
    special_tokens = {
        "bos_token_id": specials["bos"] if specials["bos"] is not None else text_cfg.get("bos_token_id"),
        "eos_token_id": [specials["eos"]] if specials["eos"] is not None else [text_cfg.get("eos_token_id")],
        "pad_token_id": specials["pad"] if specials["pad"] is not None else text_cfg.get("pad_token_id")}
    return ImageCheckpoint(spec=spec, tensors=text, source=str(folder), source_format="hf", source_files=files,
                           tokenizer_json=tokenizer_json, special_tokens=special_tokens, family="emu3", image=image,
                           vq=vq_source)


def _split_unified_tensors(raw: dict[str, LazyTensor]) -> tuple[dict[str, LazyTensor], dict[str, LazyTensor]]:
    """The unified model's tensors -> (language model under canonical names, VQ-VAE without its prefix).
    transformers 5 saves the Hub layout (text_model.model.*, text_model.lm_head, vqmodel.*); older
    code saved model.text_model.* / lm_head / model.vqmodel.*."""
    text, vq = {}, {}
    for name, tensor in raw.items():
        for prefix, target, keep in (("text_model.model.", text, ""), ("model.text_model.", text, ""),
                                     ("text_model.lm_head.", text, "lm_head."), ("lm_head.", text, "lm_head."),
                                     ("vqmodel.", vq, ""), ("model.vqmodel.", vq, "")):
            if name.startswith(prefix):
                target[keep + name[len(prefix):]] = tensor
                break
    return {k: v for k, v in text.items() if "rotary_emb" not in k}, vq


def load_emu35(folder: Path) -> ImageCheckpoint:
    """Emu3.5-style folder: a Qwen3-shaped LM (q/k norm) whose tokenizer.json holds the visual tokens.

    The IBQ vision tokenizer ships separately (config.yaml + model.ckpt) and is not exported yet:
    the bundle produces image tokens; decoding them to pixels needs that decoder.
    """
    cfg, tokenizer_json = _folder_parts(folder)
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in ("Qwen3ForCausalLM", "Emu3ForCausalLM"):
        raise CheckpointError(f"{folder}: architecture {arch!r} is not an Emu3.5-style LM (Qwen3ForCausalLM layout)")
    if tokenizer_json is None:
        raise CheckpointError(f"{folder}: no tokenizer.json: the visual token ids come from it")
    if arch == "Emu3ForCausalLM":
        # Emu3.5's own config names its q/k-norm decoder Emu3ForCausalLM; it is a Qwen3 decoder.
        spec = spec_from_config({**cfg, "architectures": ["Qwen3ForCausalLM"]}, str(folder / "config.json"))
        raw, files = safetensors_tensors(folder)
        tensors = {k.removeprefix("model."): v for k, v in raw.items() if "rotary_emb" not in k}
        check_tensors(spec, tensors, str(folder), name_of=lambda n: n if n == "lm_head.weight" else "model." + n)
        base = ImageCheckpoint(spec=spec, tensors=tensors, source=str(folder), source_format="hf", source_files=files,
                               tokenizer_json=tokenizer_json)
    else:
        base = load_hf(folder)
    image = image_layout(_tokenizer_vocab(tokenizer_json), "emu3.5", str(folder))
    image["downsample"] = 16
    specials = image["special"]
    special_tokens = dict(base.special_tokens or {})
    if specials["bos"] is not None:
        special_tokens["bos_token_id"] = specials["bos"]
    if specials["eos"] is not None:
        special_tokens["eos_token_id"] = [specials["eos"]]
    if specials["pad"] is not None:
        special_tokens["pad_token_id"] = specials["pad"]
    return ImageCheckpoint(spec=base.spec, tensors=base.tensors, source=str(folder), source_format="hf",
                           source_files=base.source_files, tokenizer_json=tokenizer_json,
                           chat_template=base.chat_template, special_tokens=special_tokens, family="emu3.5", image=image,
                           warnings=list(base.warnings) + ["Emu3.5's IBQ vision decoder is not exported: the bundle "
                                                           "generates image tokens (--save-tokens), not pixels"])
