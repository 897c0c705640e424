"""Image tokens per second of LlamaGen c2i with classifier-free guidance: ardeploy (exported bundle, ONNX
Runtime, CPU or CUDA) against a PyTorch loop written after LlamaGen's generate.py, eager and compiled,
on the same weights, each engine in its own process; JSON to --json.

Engines (--engines, comma-separated):
  ours            ardeploy's ImageGenerator on the bundle's ONNX Runtime graph; on CUDA the codes are
                  drawn on the GPU inside the captured step itself (the sampler appended to the step
                  graph, runtime/device_sampler.py: one replay per code; the first code of an image by
                  the sampler graph of its own), only [B] codes cross to the host
  ours-after-step the same with the sampler graph run after each step instead of inside it (the path before
                  the sampler joined the step: one more ONNX Runtime run and host round trip per code)
  ours-host       the same with the numpy sampler on the host (logits copied to the host every step)
  torch-eager     PyTorch loop after LlamaGen's autoregressive/models/generate.py: static KV cache
                  (module buffers [2B, heads, L, hd], L a multiple of 8), boolean causal mask over the
                  whole cache, CFG on raw logits, temperature, top-k, softmax, draw (gpt-fast's
                  exponential race, sync-free), tokens kept on the GPU until the end
  torch-compiled  the same with its decode step (model + guidance + sampling) under torch.compile
                  (mode="reduce-overhead", fullgraph: CUDA graphs), as LlamaGen's sample_c2i.py --compile
Every engine times whole images: prefill + all decode steps, warm-up first, best of --repeat.
Image tokens/s = batch * grid^2 / seconds (the unconditional rows are not counted).

Weights: random, in GPT-B's real shapes (768 wide, 12 layers, 12 heads, 16,384 codes, 1,000 classes),
drawn by scripts/llamagen_reference.py's RefLlamaGen under torch.manual_seed(0), saved as a LlamaGen
.pt that `ardeploy export --family llamagen-c2i` reads and that the PyTorch loops load: speed does not
depend on the values. `--check-codes` also exports an FP32 bundle and runs one seeded image on the
CPU (host sampler) and on --device (the default path), there with ONNX Runtime's CUDA defaults and
with TF32 matmuls off (`use_tf32=0`, put into runtime/sessions.providers for that run only): the
JSON says whether the codes are equal, else where they part and how far the logits were apart
while they were equal.

On this CPU (tiny model, about a minute plus ~2 min per torch.compile on 2 cores):
    python scripts/bench_image.py --model tiny --device cpu --dtype fp32 --sizes 64 --batches 1,2 \
        --top-k 20 --repeat 1 --check-codes --json /tmp/bench_image.json

On the H200 (after onnxruntime-gpu is installed into /tmp/site, ../shared/tools/gpu-wheels, and
`python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/ard .` in the checkout),
one command per size; measured 2026-12-01: 150 s and 170 s:
    export PYTHONPATH=/tmp/site:/tmp/ard
    python3 scripts/bench_image.py --device cuda --dtype fp16 --sizes 256 --batches 1,8 --check-codes \
        --json $OUT/image_256.json --work /tmp/bw   # exports 17 s + 10 s, ours 7 s, ours-host 9 s,
                                                    # eager 38 s, compiled 49 s (2 compiles), codes 8 s
    python3 scripts/bench_image.py --device cuda --dtype fp16 --sizes 384 --batches 1,8 \
        --json $OUT/image_384.json --work /tmp/bw   # export 15 s, ours 9 s, ours-host 18 s, eager 74 s,
                                                    # compiled 48 s
A development script: it needs torch.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch        # before onnxruntime: on the GPU machine torch's CUDA libraries are what ONNX Runtime loads
import numpy as np
from llamagen_reference import RefLlamaGen, find_multiple, grid_rope_table      # beside this script

# LlamaGen's c2i shapes (its GPT_B / GPT_L / GPT_XL: 111M, 343M, 775M parameters), random weights
MODELS = {"gpt-b": dict(dim=768, n_layer=12, n_head=12, vocab=16384, num_classes=1000),
          "gpt-l": dict(dim=1024, n_layer=24, n_head=16, vocab=16384, num_classes=1000),
          "gpt-xl": dict(dim=1280, n_layer=36, n_head=20, vocab=16384, num_classes=1000),
          "tiny": dict(dim=64, n_layer=2, n_head=4, vocab=256, num_classes=10)}
ENGINES = ("ours", "ours-after-step", "ours-host", "torch-eager", "torch-compiled")
CHILD_TIMEOUT = {"ours": 240, "ours-after-step": 240, "ours-host": 240, "torch-eager": 300, "torch-compiled": 420,
                 "codes": 300}
HERE = Path(__file__).resolve()


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-b", choices=sorted(MODELS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--sizes", default="256", help="image sizes in pixels (VQ-16: 16 pixels per token)")
    ap.add_argument("--batches", default="1,8", help="images per batch (each also runs an unconditional row)")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--top-k", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--check-codes", action="store_true", help="FP32 bundle: the CPU's codes against --device's")
    ap.add_argument("--work", help="folder for the checkpoint and bundles (default: a temporary one)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)          # run one engine (internal)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def say(*parts) -> None:
    print("[bench_image]", *parts, flush=True)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def class_ids(model: str, batch: int) -> list[int]:
    """ImageNet 207 (golden retriever) and the classes after it."""
    return [(207 + i) % MODELS[model]["num_classes"] for i in range(batch)]


# -- weights and bundles (parent process) -------------------------------------------------------------
def make_reference(model: str, size: int) -> RefLlamaGen:
    torch.manual_seed(0)
    return RefLlamaGen("c2i", grid=size // 16, **MODELS[model]).eval()


def checkpoint(args, work: Path) -> Path:
    """The random weights as a LlamaGen .pt (the grid does not change any tensor: one file for all sizes)."""
    path = work / f"{args.model}.pt"
    if not path.exists():
        ref = make_reference(args.model, 256)
        torch.save({"model": ref.gpt_state_dict()}, path)
        say(f"weights: {sum(p.numel() for p in ref.parameters()) / 1e6:.1f}M parameters -> {path}")
    return path


def bundle(args, work: Path, ckpt: Path, size: int, dtype: str) -> Path:
    from ardeploy.export.bundle import export_path
    out = work / f"bundle_{size}_{dtype}_b{2 * max(ints(args.batches))}"
    if not (out / "manifest.json").exists():
        started = time.perf_counter()
        options = {"image_size": size, "n_head": MODELS[args.model]["n_head"]}
        export_path(ckpt, out, family="llamagen-c2i", family_options=options, dtype=dtype,
                    max_batch=2 * max(ints(args.batches)), score_graph=False, quiet=True)
        say(f"exported {out.name} in {time.perf_counter() - started:.0f} s")
    return out


# -- ours ---------------------------------------------------------------------------------------------
def run_ours(args, size: int, bundle_dir: Path, sampler: str, in_step: bool = True) -> list[dict]:
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.backends import load_backend
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    from ardeploy.runtime.run_options import RunOptions
    options = RunOptions(threads=args.threads, device=args.device)
    gen = ImageGenerator.load(bundle_dir, options)
    if not in_step:                 # a backend without the sampler appended to its step graph
        gen.backend.close()
        gen.backend = load_backend(gen.bundle, options)
    say(f"ours ({sampler} sampler, in the step: {gen.backend.sampler_tail}): graph {gen.backend.graph}, "
        f"flavor {gen.backend.flavor}, device {args.device}")
    out = []
    for batch in ints(args.batches):
        requests = [ImageRequest(class_id=c) for c in class_ids(args.model, batch)]
        settings = ImageSettings(Guidance(args.cfg), SamplingConfig(top_k=args.top_k), seed=0, sampler=sampler)
        # in the fastest batch: backend_run_s the transformer's runs (with the codes drawn inside the step),
        # sampler_s the calls of the sampler graph of its own
        last = {}
        row = timed(args, size, batch, lambda: last.update(results=gen.generate(requests, settings, decode=False)),
                    {"backend_run_s": gen.backend.run_seconds, "sampler_s": gen.sampler_seconds})
        row["codes_drawn_in_step"] = last["results"][0].timings["codes_drawn_in_step"]
        out.append(row)
    return out


def timed(args, size: int, batch: int, run, counters: dict | None = None) -> dict:
    """Warm-up, then the best of --repeat runs of `run` (one batch of images); counters: name ->
    seconds some part has taken so far, reported for the best run."""
    counters = counters or {}
    run()
    seconds, parts = [], []
    for _ in range(args.repeat):
        before = {name: count() for name, count in counters.items()}
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
        parts.append({name: round(count() - before[name], 4) for name, count in counters.items()})
    tokens = batch * (size // 16) ** 2
    best = min(seconds)
    row = {"batch": batch, "image_tokens_per_s": round(tokens / best, 1), "seconds": [round(s, 4) for s in seconds],
           **parts[seconds.index(best)]}
    say(f"  batch {batch}: {tokens / best:,.0f} image tokens/s ({best:.3f} s per batch; runs {seconds}) "
        f"{parts[seconds.index(best)]}")
    return row


# -- the PyTorch loop after LlamaGen's generate.py ------------------------------------------------------
class StaticLoop(torch.nn.Module):
    """RefLlamaGen with its KV cache, causal mask and rotary table as buffers (static addresses, what
    CUDA graphs need), and the guided sampling of one step."""

    def __init__(self, ref: RefLlamaGen, batch: int, device: str, dtype: torch.dtype, cfg: float, top_k: int):
        super().__init__()
        self.ref = ref.to(device=device, dtype=dtype)
        self.ref.table = grid_rope_table(ref.grid, ref.hd, ref.prefix).to(device)      # float32, as LlamaGen
        self.batch, self.cfg, self.top_k = batch, cfg, top_k
        length = find_multiple(ref.prefix + ref.grid ** 2, 8)
        rows = 2 * batch
        for i in range(len(ref.layers)):
            for kind in ("k", "v"):
                self.register_buffer(f"{kind}{i}", torch.zeros(rows, ref.n_head, length, ref.hd, device=device,
                                                               dtype=dtype))
        self.register_buffer("causal", torch.tril(torch.ones(length, length, dtype=torch.bool, device=device)))

    def caches(self):
        return [(getattr(self, f"k{i}"), getattr(self, f"v{i}")) for i in range(len(self.ref.layers))]

    def pick(self, logits):
        """CFG on raw logits (cond rows first), temperature 1, top-k (ties kept), softmax, one draw."""
        cond, uncond = logits.split(self.batch)
        guided = uncond + (cond - uncond) * self.cfg
        kth = torch.topk(guided, self.top_k)[0][:, -1:]
        guided = torch.where(guided < kth, torch.full_like(guided, -float("inf")), guided)
        probs = torch.softmax(guided, dim=-1)
        return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)

    def prefill(self, classes):
        cond = torch.cat([classes, torch.full_like(classes, self.ref.num_classes)])
        pos = torch.arange(self.ref.prefix, device=classes.device)
        logits = self.ref(self.ref.cond_embeddings(cond), pos, self.causal[None, None, pos], self.caches())
        return self.pick(logits[:, -1])

    def decode_one(self, codes, pos):
        x = torch.cat([codes, codes])[:, None]
        logits = self.ref(self.ref.tok_embeddings(x), pos, self.causal[None, None, pos], self.caches())
        return self.pick(logits[:, -1])


def torch_generate(loop: StaticLoop, step, classes, n_codes: int, device: str):
    """LlamaGen's generate(): prefill, then n_codes - 1 decode steps; tokens stay on the device."""
    codes = [loop.prefill(classes)]
    pos = torch.tensor([loop.ref.prefix], device=device)
    for _ in range(n_codes - 1):
        if device == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        codes.append(step(codes[-1], pos).clone())
        pos += 1
    out = torch.stack(codes, 1)
    if device == "cuda":
        torch.cuda.synchronize()
    return out


def run_torch(args, size: int, ckpt: Path, compiled: bool) -> list[dict]:
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    out = []
    for batch in ints(args.batches):
        ref = make_reference(args.model, size)
        ref.load_state_dict(torch.load(ckpt, weights_only=True)["model"], strict=False)    # the bundle's weights
        loop = StaticLoop(ref, batch, args.device, dtype, args.cfg, args.top_k).eval()
        step = loop.decode_one
        if compiled:
            step = torch.compile(loop.decode_one, mode="reduce-overhead", fullgraph=True)
        classes = torch.tensor(class_ids(args.model, batch), device=args.device)
        with torch.inference_mode():
            started = time.perf_counter()
            torch_generate(loop, step, classes, (size // 16) ** 2, args.device)       # compiles (if compiled)
            say(f"torch {'compiled' if compiled else 'eager'} batch {batch}: first run "
                f"{time.perf_counter() - started:.1f} s")
            out.append(timed(args, size, batch, lambda: torch_generate(loop, step, classes, (size // 16) ** 2,
                                                                          args.device)))
        del loop, step
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return out


# -- same codes as the CPU --------------------------------------------------------------------------------
def codes_check(args, bundle_dir: Path) -> dict:
    """One seed, batch 1, the FP32 bundle: the host sampler on the CPU against the default path on
    --device, with ONNX Runtime's CUDA defaults (TF32 matmuls) and with TF32 off."""
    cpu_codes, cpu_trace = one_image(args, bundle_dir, "cpu")
    result = {"reference": "cpu, host sampler"}
    variants = {"default": None} if args.device == "cpu" else {"default": None, "use_tf32=0": {"use_tf32": "0"}}
    for name, cuda_options in variants.items():
        codes, trace = one_image(args, bundle_dir, args.device, cuda_options)
        differ = np.nonzero(cpu_codes != codes)[0]
        first = int(differ[0]) if len(differ) else None
        upto = len(cpu_trace) if first is None else first + 1          # the steps fed the same codes
        delta = max(float(np.abs(a - b).max()) for a, b in zip(cpu_trace[:upto], trace[:upto]))
        result[f"{args.device} {name}"] = {"same_codes": first is None, "codes": int(len(codes)),
                                            "first_difference": first, "max_abs_dlogits_while_equal": delta}
    say(f"codes check: {result}")
    return result


def one_image(args, bundle_dir: Path, device: str, cuda_options: dict | None = None):
    """(codes [h*w], each step's logits) of one seeded image; cuda_options: CUDA provider options
    put into runtime/sessions.providers for this run (a benchmark-only experiment)."""
    from ardeploy.runtime import SamplingConfig, sessions
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings
    plain = sessions.providers
    if cuda_options:
        def with_options(device, cuda_graph=False):
            return [(name, {**(opts or {}), **cuda_options}) if name == "CUDAExecutionProvider" else name
                    for name, opts in ((p, None) if isinstance(p, str) else p for p in plain(device, cuda_graph))]
        sessions.providers = with_options
    try:
        gen = ImageGenerator.load(bundle_dir, threads=args.threads, device=device)
        trace: list = []
        settings = ImageSettings(Guidance(args.cfg), SamplingConfig(top_k=args.top_k), seed=0,
                                 sampler="host" if device == "cpu" else "auto")
        res = gen.generate([ImageRequest(class_id=class_ids(args.model, 1)[0])], settings, trace=trace, decode=False)
        return res[0].codes.reshape(-1), trace
    finally:
        sessions.providers = plain


# -- processes ------------------------------------------------------------------------------------------
def child(args) -> int:
    work = Path(args.work)
    ckpt = work / f"{args.model}.pt"
    if args.child.startswith("ours"):
        path = work / f"bundle_{args.size}_{args.dtype}_b{2 * max(ints(args.batches))}"
        result = run_ours(args, args.size, path, "host" if args.child == "ours-host" else "auto",
                          in_step=args.child == "ours")
    elif args.child == "codes":
        result = codes_check(args, work / f"bundle_{args.size}_fp32_b{2 * max(ints(args.batches))}")
    else:
        result = run_torch(args, args.size, ckpt, compiled=args.child == "torch-compiled")
    Path(args.child_out).write_text(json.dumps(result))
    return 0


def spawn(args, kind: str, size: int, work: Path) -> dict | list | None:
    out = work / f"result_{kind}_{size}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE), "--child", kind, "--child-out", str(out), "--size", str(size),
           "--work", str(work), "--model", args.model, "--device", args.device, "--dtype", args.dtype,
           "--batches", args.batches, "--cfg", str(args.cfg), "--top-k", str(args.top_k), "--repeat", str(args.repeat)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    say(f"{kind} at {size}x{size} (own process)")
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, timeout=CHILD_TIMEOUT[kind])
    except subprocess.TimeoutExpired:
        say(f"{kind}: timed out after {CHILD_TIMEOUT[kind]} s")
        return {"error": f"timed out after {CHILD_TIMEOUT[kind]} s"}
    say(f"{kind}: {time.perf_counter() - started:.0f} s")
    if done.returncode or not out.exists():
        return {"error": f"exit status {done.returncode}"}
    return json.loads(out.read_text())


def environment(args) -> dict:
    import onnxruntime
    env = {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
           "providers": onnxruntime.get_available_providers(), "cpu": platform.processor() or platform.machine()}
    if args.device == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def ratios(results: list) -> dict:
    """ours / each peer, per batch."""
    by = {(r["engine"], row["batch"]): row["image_tokens_per_s"] for r in results if isinstance(r.get("rows"), list)
          for row in r["rows"]}
    out = {}
    for (engine, batch), rate in by.items():
        if engine != "ours" and ("ours", batch) in by:
            out[f"ours/{engine} batch {batch}"] = round(by[("ours", batch)] / rate, 3)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    engines = [e for e in args.engines.split(",") if e]
    if bad := [e for e in engines if e not in ENGINES]:
        raise SystemExit(f"unknown engine {bad[0]} (choose from {', '.join(ENGINES)})")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_image_"))
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    ckpt = checkpoint(args, work)
    report = {"model": f"LlamaGen c2i, {args.model} shapes, random weights (RefLlamaGen, torch.manual_seed(0))",
              "device": args.device, "dtype": args.dtype, "cfg": args.cfg, "top_k": args.top_k,
              "environment": environment(args), "sizes": {}}
    for size in ints(args.sizes):
        if engines:
            bundle(args, work, ckpt, size, args.dtype)
        results = [{"engine": e, "rows": spawn(args, e, size, work)} for e in engines]
        entry = {"results": results, "ratios": ratios(results)}
        if args.check_codes:
            bundle(args, work, ckpt, size, "fp32")
            entry["codes_check"] = spawn(args, "codes", size, work)
        report["sizes"][str(size)] = entry
        say(f"{size}x{size}: {json.dumps(entry['ratios'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
