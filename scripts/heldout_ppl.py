"""Perplexity of bundles and of llama.cpp's GGUF variants on the same token windows of held-out texts, each
bundle's ratio to a reference bundle (its FP32 source) and each GGUF's ratio to llama.cpp's F32 file.

    python scripts/heldout_ppl.py --texts legal.txt,markdown.txt --reference bundles/smollm2 \
        --bundles /tmp/w4a16 --gguf ~/.cache/ardeploy/SmolLM2-135M-Instruct.Q4_1.gguf --llamacpp f32,q4_0 \
        --max-tokens 16384 --threads 2 --json heldout.json

Texts are tokenized once with the reference bundle's tokenizer (converted from the same GGUF, so llama.cpp
reads the same ids); windows of --seq-len tokens, stride --seq-len (calibration/evaluate.py's definition:
every token after a window's first is scored once). llama.cpp variants come from scripts/bench_peers.py
(f32 and f16: the shipped file dequantized; q4_0: llama.cpp's own quantization of the F32 file, its
default choices for the other tensors). A development script: llama.cpp needs llama-cpp-python.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def llamacpp_run(path: Path, seq_len: int, threads: int):
    """run(ids) -> logits [len(ids), vocab] of a GGUF file through llama-cpp-python."""
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=seq_len, n_batch=seq_len, n_threads=threads, logits_all=True,
                verbose=False)

    def run(ids: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval([int(t) for t in ids])
        return np.array(llm.scores[:len(ids)], np.float32)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", required=True, help="comma-separated text files (blank-line-separated documents)")
    ap.add_argument("--reference", required=True, help="the FP32 bundle the others are compared with")
    ap.add_argument("--bundles", default="", help="comma-separated bundles")
    ap.add_argument("--gguf", help="the shipped GGUF (for --llamacpp)")
    ap.add_argument("--llamacpp", default="", help="comma-separated variants: f32, f16, q4_0, q4_1")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "ardeploy"), help="where GGUF variants are kept")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_peers import llamacpp_file
    from ardeploy.calibration.data import load_stream
    from ardeploy.calibration.evaluate import bundle_perplexity, perplexity
    from ardeploy.runtime.bundle import Bundle
    reference = Bundle.load(args.reference)
    bundles = [Bundle.load(b) for b in args.bundles.split(",") if b]
    variants = [v for v in args.llamacpp.split(",") if v]
    peers = SimpleNamespace(gguf=args.gguf, cache=args.cache, threads=args.threads)
    results = {}
    for text in args.texts.split(","):
        stream = load_stream(reference, text)[0][:args.max_tokens]
        row = {"tokens": int(len(stream))}
        for bundle in [reference, *bundles]:
            row[str(bundle.path)] = bundle_perplexity(bundle, stream, args.seq_len, args.seq_len, args.threads,
                                                      progress=False)["ppl"]
        for variant in variants:
            run = llamacpp_run(llamacpp_file(peers, variant), args.seq_len, args.threads)
            row[f"llama.cpp {variant}"] = perplexity(run, stream, args.seq_len, args.seq_len, progress=False)["ppl"]
        ref = row[str(reference.path)]
        ratios = {name: round(value / ref, 4) for name, value in row.items() if name not in ("tokens",)}
        if "llama.cpp f32" in row:
            ratios.update({f"{name} / llama.cpp f32": round(row[name] / row["llama.cpp f32"], 4)
                           for name in row if name.startswith("llama.cpp")})
        results[text] = {"perplexity": row, "ratio_to_reference": ratios}
        print(f"{text}: {len(stream)} tokens", json.dumps(results[text], indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
