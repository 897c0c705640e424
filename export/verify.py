"""`ardeploy verify`: run a bundle in ONNX Runtime and compare it with the PyTorch reference.

ONNX Runtime runs prefill and N greedy decode steps through the runtime's decode primitive and its
preallocated KV arena (the real runtime path, on the graph --flavor picks). The same tokens are fed to our PyTorch modules (float32,
with their own cache) and, when asked and available, to `transformers`. Reported per step: max
|Δlogits| and whether the argmax agrees.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..runtime.bundle import Bundle
from ..runtime.decode import Rows
from ..runtime.backends import load_backend
from ..runtime.run_options import RunOptions
from ..runtime.errors import UserError
from .model import build_model
from .registry import family_of, load_checkpoint, reread_options

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time,"


def default_prompt_ids(bundle, n_random: int = 12) -> list[int]:
    tok = bundle.tokenizer()
    if tok is not None:
        return tok.encode(DEFAULT_PROMPT).ids
    rng = np.random.default_rng(0)     # token-id bundles (image models): random ids, half the cache at most
    return rng.integers(0, bundle.vocab_size, max(1, min(n_random, bundle.max_seq // 2))).tolist()


def run_bundle_greedy(backend, bundle, prompt_ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits of every step, through the runtime's decode primitive and arena."""
    rows = Rows(backend, backend.new_arena(1))
    logits = np.array(rows.start([prompt_ids], bundle.pad_id), np.float32)
    out_tokens, out_logits = [], [logits[0]]
    for _ in range(steps):
        tok = int(np.argmax(logits[0]))
        out_tokens.append(tok)
        if len(out_tokens) == steps:
            break
        logits = np.array(rows.feed(np.asarray([[tok]], dtype=np.int64)), np.float32)
        out_logits.append(logits[0])
    return out_tokens, out_logits


@torch.no_grad()
def torch_step_logits(model, prompt_ids: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Our PyTorch modules, fed the same tokens step by step with their own (time-major) cache."""
    ids = torch.tensor([prompt_ids])
    logits, presents = model(ids, torch.ones_like(ids))
    past = presents
    out = [logits[0].float().numpy()]
    total = len(prompt_ids)
    for tok in tokens[:-1]:
        total += 1
        logits, new = model(torch.tensor([[tok]]), torch.ones(1, total, dtype=torch.long), past)
        past = [(torch.cat([pk, k]), torch.cat([pv, v])) for (pk, pv), (k, v) in zip(past, new)]
        out.append(logits[0].float().numpy())
    return out


@torch.no_grad()
def transformers_step_logits(hf_model, prompt_ids: list[int], tokens: list[int]) -> list[np.ndarray]:
    """All steps' logits from one full forward pass of `transformers` over prompt + tokens."""
    seq = torch.tensor([prompt_ids + tokens[:-1]])
    logits = hf_model(seq).logits[0].float().numpy()
    n = len(prompt_ids)
    return [logits[n - 1 + i] for i in range(len(tokens))]


def load_transformers(source: Path, class_name: str):
    """transformers' own model of the source: from the GGUF file itself, else `class_name` from the folder."""
    import transformers
    if source.suffix == ".gguf":
        return transformers.AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                                 dtype=torch.float32).eval()
    return getattr(transformers, class_name).from_pretrained(str(source), dtype=torch.float32).eval()


def compare(name: str, ref: list[np.ndarray], got: list[np.ndarray], got_tokens: list[int]) -> dict:
    deltas = [float(np.max(np.abs(r - g))) for r, g in zip(ref, got)]
    ref_tokens = [int(np.argmax(r)) for r in ref]
    first_diff = next((i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens)) if a != b), None)
    return {"reference": name, "max_abs_dlogits": max(deltas), "per_step_max_abs_dlogits": deltas,
            "greedy_agree": first_diff is None, "first_disagreement_step": first_diff}


def verify_bundle(bundle_path, source=None, steps: int = 16, prompt_ids=None, with_transformers: bool | None = None,
                  options: RunOptions | None = None, **changes) -> dict:
    """options: how ONNX Runtime runs the bundle (runtime/run_options.py; keywords override single fields;
    TensorRT engines are `ardeploy compare`'s)."""
    options = (options or RunOptions()).replace(**changes)
    if options.backend != "ort":
        raise UserError("verify runs the bundle in ONNX Runtime; compare TensorRT engines with `ardeploy compare`")
    bundle = Bundle.load(bundle_path)
    src = Path(source or bundle.manifest["source"]["path"])
    if bundle.manifest["dtype"] == "bf16":
        raise UserError(f"{bundle.path}: a bf16 bundle; ONNX Runtime's CPU provider does not run bfloat16 graphs: "
                        f"verify an fp32 or fp16 export, or build the bf16 bundle with TensorRT")
    if steps < 1:
        raise UserError(f"--steps must be at least 1 (got {steps})")
    prompt_ids = list(prompt_ids or default_prompt_ids(bundle))
    bad = [t for t in prompt_ids if not 0 <= t < bundle.vocab_size]
    if bad:
        raise UserError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary [0, {bundle.vocab_size})")
    if len(prompt_ids) >= bundle.max_seq:
        raise UserError(f"prompt of {len(prompt_ids)} tokens does not fit the bundle's max_seq {bundle.max_seq}")
    steps = min(steps, bundle.max_seq - len(prompt_ids))
    report = {"bundle": str(bundle_path), "source": str(src), "dtype": bundle.manifest["dtype"],
              "prompt_tokens": len(prompt_ids), "steps": steps}
    started = time.perf_counter()
    backend = load_backend(bundle, options)
    tokens, ort_logits = run_bundle_greedy(backend, bundle, prompt_ids, steps)
    report["ort_seconds"] = round(time.perf_counter() - started, 3)
    report["graph"] = backend.graph
    report["device"] = backend.device
    report["tokens"] = tokens
    _compare_references(report, src, bundle.manifest, prompt_ids, tokens, ort_logits, with_transformers)
    return report


def _compare_references(report: dict, src: Path, manifest: dict, prompt_ids: list[int], tokens: list[int],
                        ort_logits: list[np.ndarray], with_transformers: bool | None) -> None:
    """Our PyTorch modules, read from the source again, and transformers when the family says so."""
    ckpt = load_checkpoint(src, **reread_options(manifest))
    family = family_of(ckpt)
    model = build_model(ckpt.spec, ckpt.state_dict(), torch.float32, family.decoder)
    report["comparisons"] = [compare("ardeploy-pytorch-fp32", torch_step_logits(model, prompt_ids, tokens),
                                     ort_logits, tokens)]
    if with_transformers is None:
        with_transformers = family.compare_by_default
    if not with_transformers:
        return
    try:
        hf = load_transformers(src, family.transformers_class)
    except ImportError:
        report["transformers"] = "not installed (pip install transformers)"
        return
    report["comparisons"].append(compare("transformers-fp32", transformers_step_logits(hf, prompt_ids, tokens),
                                         ort_logits, tokens))
