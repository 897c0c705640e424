"""Random-weight Hugging Face folders in the shapes of real models, for speed measurements.

    python scripts/gpu_shapes.py SHAPE --out HF_FOLDER [--device cuda|cpu] [--dtype fp16|bf16|fp32] [--layers N]

SHAPE is one of smollm2-135m, llama-3.2-1b, llama-3-8b (the published configs' sizes, RoPE and tying).
Decode speed does not depend on the weights' values, and real weights of the larger shapes cannot be
fetched where the benchmarks run, so the weights are drawn at random (seed 0) on --device, which takes
seconds even for the 8B shape on a GPU. The folder also gets what the peers' loaders need:
a WordLevel tokenizer of vocab_size entries saved through transformers' PreTrainedTokenizerFast
(ONNX Runtime GenAI's builder reads tokenizer files; the tokens are "t0", "t1", ...) and a greedy
generation_config.json, and gpu_shape.json naming the shape (bench_peers.py records it). --layers N keeps
only N decoder layers (quick CPU checks).

The folder is written under a temporary name beside --out and renamed at the end, so a failed run
leaves nothing; --out must not exist (or be an empty folder): nothing already there is overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192}
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
                         eos_token_id=128001, rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0}),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}
DTYPES = ("fp16", "bf16", "fp32")


class ShapeError(Exception):
    """Bad input: reported as one line, exit status 2."""


def shape_config(shape: str, layers: int | None = None) -> dict:
    """The LlamaConfig keyword arguments of SHAPE (with --layers applied)."""
    if shape not in SHAPES:
        raise ShapeError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    cfg = dict(SHAPES[shape])
    if layers is not None:
        if layers < 1:
            raise ShapeError(f"--layers must be at least 1 (got {layers})")
        cfg["num_hidden_layers"] = layers
    return cfg


def parameter_count(cfg: dict) -> int:
    """Parameters of a Llama of these sizes (no biases), from the config alone."""
    h, hd, layers = cfg["hidden_size"], cfg["head_dim"], cfg["num_hidden_layers"]
    attn = h * hd * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])      # q, o; k, v
    block = attn + 3 * h * cfg["intermediate_size"] + 2 * h                                 # MLP, two norms
    heads = 1 if cfg["tie_word_embeddings"] else 2
    return heads * cfg["vocab_size"] * h + layers * block + h


def check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShapeError(f"{out}: already exists and is not an empty folder (give a new --out)")


def write_tokenizer(folder: Path, vocab_size: int, bos: int, eos: int) -> None:
    """A WordLevel tokenizer with one token per id ("t{id}"), whitespace-split; bos/eos named by id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"t{bos}", eos_token=f"t{eos}", unk_token="t0",
                                   pad_token=f"t{eos}")
    fast.save_pretrained(str(folder))


def write_generation_config(folder: Path, bos: int, eos: int) -> None:
    """Greedy by default. The benchmarks decode a fixed number of tokens and switch EOS off in each peer
    (random weights may pick the EOS id), so stopping is left to them; pad = eos keeps generate() quiet."""
    cfg = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def build(shape: str, out: Path, device: str = "cpu", dtype: str = "fp16", layers: int | None = None,
          log=print) -> dict:
    """Write the folder; returns a summary (parameters, bytes, seconds)."""
    cfg_kw = shape_config(shape, layers)
    if dtype not in DTYPES:
        raise ShapeError(f"unknown --dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    out = Path(out)
    check_out(out)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    if device == "cuda" and not torch.cuda.is_available():
        raise ShapeError("--device cuda: torch sees no CUDA GPU")
    started = time.perf_counter()
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    work.mkdir(parents=True)
    try:
        config = LlamaConfig(**cfg_kw)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        model = model.to({"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).eval()
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{shape}: {n_params / 1e6:.1f} M parameters drawn on {device} in {time.perf_counter() - started:.1f} s",
            flush=True)
        model.save_pretrained(str(work))
        del model
        write_tokenizer(work, config.vocab_size, config.bos_token_id, config.eos_token_id)
        write_generation_config(work, config.bos_token_id, config.eos_token_id)
        marker = {"shape": shape, "layers": config.num_hidden_layers, "dtype": dtype, "seed": 0}
        (work / "gpu_shape.json").write_text(json.dumps(marker) + "\n")     # what bench_peers.py records
        if out.exists():
            out.rmdir()                  # empty (checked above)
        os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    seconds = time.perf_counter() - started
    log(f"{out}: {size / 2**30:.2f} GiB written in {seconds:.1f} s", flush=True)
    return {"shape": shape, "parameters": n_params, "bytes": size, "seconds": seconds, "layers": cfg_kw["num_hidden_layers"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("shape", help=", ".join(SHAPES))
    ap.add_argument("--out", required=True, help="the Hugging Face folder to write (must not exist yet)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where the weights are drawn")
    ap.add_argument("--dtype", default="fp16", choices=DTYPES)
    ap.add_argument("--layers", type=int, help="keep only this many decoder layers")
    args = ap.parse_args(argv)
    try:
        build(args.shape, Path(args.out), args.device, args.dtype, args.layers)
    except ShapeError as e:
        print(f"gpu_shapes.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
