"""Image tokens per second: a GPT-B-sized random LlamaGen c2i model at 256x256 (16x16 tokens) with CFG,
through our runtime (exported bundle, ONNX Runtime) and through the plain PyTorch reference loop of
scripts/llamagen_reference.py (LlamaGen's cached generation), in the same run and on the same weights.

    python scripts/bench_image.py [--threads 2] [--images 1] [--keep DIR]

A development script: it needs torch.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from llamagen_reference import RefLlamaGen, ref_generate      # beside this script


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=1, help="images per batch (each adds an unconditional row)")
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--top-k", type=int, default=2000)
    ap.add_argument("--keep", help="folder to keep the checkpoint and bundle in (default: a temporary one)")
    return ap.parse_args(argv)


def export_once(ref, work: Path, images: int) -> tuple[Path, float]:
    """The reference's weights as a LlamaGen .pt file, exported to a bundle (both kept in `work`)."""
    from ardeploy.export.bundle import export_path
    ckpt = work / "gpt_b.pt"
    if not ckpt.exists():
        torch.save({"model": ref.gpt_state_dict()}, ckpt)
    bundle = work / "bundle"
    started = time.perf_counter()
    if not (bundle / "manifest.json").exists():
        export_path(ckpt, bundle, family="llamagen-c2i", family_options={"image_size": 256}, max_batch=2 * images,
                    score_graph=False, quiet=True)
    return bundle, time.perf_counter() - started


def time_ours(bundle: Path, classes: list[int], args):
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    gen = ImageGenerator.load(bundle, threads=args.threads)
    settings = ImageSettings(Guidance(args.cfg), SamplingConfig(top_k=args.top_k), seed=0)
    gen.generate([ImageRequest(class_id=c) for c in classes], settings, decode=False)      # warm-up
    started = time.perf_counter()
    ours = gen.generate([ImageRequest(class_id=c) for c in classes], settings, decode=False)
    return ours, time.perf_counter() - started


def time_reference(ref, classes: list[int], args):
    with torch.inference_mode():
        ref_generate(ref, torch.tensor(classes), args.cfg, top_k=args.top_k, seed=0)     # warm-up
        started = time.perf_counter()
        ref_codes, _ = ref_generate(ref, torch.tensor(classes), args.cfg, top_k=args.top_k, seed=0)
        return ref_codes, time.perf_counter() - started


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_image_"))
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ref = RefLlamaGen("c2i", grid=16, dim=768, n_layer=12, n_head=12, vocab=16384, num_classes=1000).eval()
    n_params = sum(p.numel() for p in ref.parameters())
    bundle, export_s = export_once(ref, work, args.images)

    classes = [207 + i for i in range(args.images)]
    n_tokens = 256 * args.images
    ours, ours_s = time_ours(bundle, classes, args)
    ref_codes, ref_s = time_reference(ref, classes, args)
    same = np.array_equal(np.stack([r.codes.reshape(-1) for r in ours]), ref_codes.numpy())

    print(f"GPT-B-sized random LlamaGen c2i ({n_params / 1e6:.0f}M params), 256x256 = 16x16 tokens, CFG {args.cfg} "
          f"({2 * args.images} rows), top-k {args.top_k}, {args.threads} threads; export {export_s:.0f} s")
    print(f"  ardeploy (ONNX Runtime, fp32): {n_tokens / ours_s:7.1f} image tokens/s  ({ours_s:.2f} s incl. prefill; "
          f"decode steps {ours[0].timings['image_tokens_per_s']:.1f} tok/s)")
    print(f"  PyTorch reference loop (fp32): {n_tokens / ref_s:7.1f} image tokens/s  ({ref_s:.2f} s)")
    print(f"  same tokens: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
