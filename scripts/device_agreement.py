"""One bundle, two devices: do the CPU and the GPU give the same answers?

    python scripts/device_agreement.py BUNDLE [--prompts 10] [--new-tokens 48] [--ppl TEXT] [--json OUT]

Greedy chat answers to the first --prompts prompts of scripts/prompts/speculation.json (open-ended ones
first, then the copy-heavy ones), generated on the CPU and on CUDA in one process: per prompt, the index of
the first token where the two answers part (null: identical) and the share of identical positions. With
--ppl, `ardeploy eval` of the same text on both devices and their ratio. Quantized bundles run different
numerics per device (bundle manifest "numerics"; docs/CALIBRATION.md): this measures how far that goes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROMPTS = Path(__file__).with_name("prompts") / "speculation.json"


def answers(bundle: str, device: str, prompts: list[str], new_tokens: int) -> list[list[int]]:
    from ardeploy.runtime import Generator, SamplingConfig
    from ardeploy.runtime.run_options import RunOptions
    cfg = SamplingConfig(greedy=True, max_new_tokens=new_tokens)
    with Generator.load(bundle, RunOptions(device=device), max_batch=1) as gen:
        return [gen.generate(gen.encode(p, chat=True), cfg).token_ids for p in prompts]


def agreement(a: list[int], b: list[int]) -> dict:
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    same = sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)
    return {"first_difference": first, "same_positions": round(same, 3)}


def perplexity(bundle: str, device: str, text: str) -> float:
    cmd = [sys.executable, "-m", "ardeploy.cli", "eval", bundle, "--ppl", text, "--device", device, "--json", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(done.stdout)["ppl"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--ppl", help="a text file for `ardeploy eval` on both devices")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()
    try:
        import torch  # noqa: F401  - its CUDA libraries are what ONNX Runtime's CUDA provider loads
    except ImportError:
        pass
    sets = json.loads(PROMPTS.read_text())
    prompts = (sets["open"] + sets["copy"])[:args.prompts]
    cpu = answers(args.bundle, "cpu", prompts, args.new_tokens)
    gpu = answers(args.bundle, "cuda", prompts, args.new_tokens)
    rows = [agreement(a, b) for a, b in zip(cpu, gpu)]
    report = {"bundle": args.bundle, "prompts": len(prompts), "new_tokens": args.new_tokens, "per_prompt": rows,
              "identical_answers": sum(r["first_difference"] is None for r in rows),
              "same_positions": round(sum(r["same_positions"] for r in rows) / len(rows), 3)}
    if args.ppl:
        p_cpu, p_gpu = perplexity(args.bundle, "cpu", args.ppl), perplexity(args.bundle, "cuda", args.ppl)
        report["perplexity"] = {"cpu": p_cpu, "cuda": p_gpu, "cuda_over_cpu": round(p_gpu / p_cpu, 4)}
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
