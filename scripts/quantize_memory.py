"""Time and peak host memory of `ardeploy calibrate`, one weight method per child process.

    python scripts/quantize_memory.py BUNDLE [--methods rtn,awq,awq-gptq] [--scheme w4a16] [--samples 4]
        [--seq-len 128] [--check-windows 4] [--data calib.txt] [--compute auto|numpy|torch|cuda]
        [--layers-per-pass N] [--device cpu|cuda] [--keep DIR] [--json]

Each method runs `calibrate_bundle` in a fresh Python process (so each peak is its own), on --data or, without
it, on random token ids (seed 0: the random-weight models of scripts/gpu_shapes.py have no real text), then
loads the quantized bundle with the runtime and generates 8 greedy tokens (the bundle loads and runs).
Reported per method: seconds (calibration total and its stages from calibration.json), peak RSS of the
calibration (VmHWM, read before the load check), that peak over the source bundle's weights bytes, the
load check's own peak and tokens, and the GPU's peak memory when torch ran on CUDA. The quantized
bundles are deleted unless --keep DIR (they are as large as a third of the source).

For the Llama-3-8B shape on a GPU machine (--shape makes BUNDLE first when it does not exist: random fp16
weights drawn by scripts/gpu_shapes.py on the GPU, exported with --max-seq 1024, the folder deleted; ~2 min):

    python scripts/quantize_memory.py /tmp/b8b --shape llama-3-8b --methods rtn     # then awq, then awq-gptq
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INT4 = ("rtn", "awq", "gptq", "awq-gptq")
INT8 = ("max", "mse", "gptq")


def peak_rss_bytes() -> int:
    """VmHWM of this process (peak resident set: anonymous and mapped file pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs), where allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class RssSampler:
    """VmRSS every `every` seconds on a thread: where in the run the peak falls (the log's stage names
    and calibration.json's seconds place it)."""

    def __init__(self, every: float = 0.5):
        import threading
        self.samples, self.every, self.stop = [], every, threading.Event()
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            with open("/proc/self/status") as f:
                rss = next((int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:")), 0)
            self.samples.append((round(time.perf_counter() - self.t0, 1), rss))

    def done(self) -> list:
        self.stop.set()
        self.thread.join()
        return self.samples


def child(a) -> dict:
    """One calibration in this process; returns what the parent reports."""
    import numpy as np
    from ardeploy.calibration.quantize import CalibConfig, calibrate_bundle
    from ardeploy.runtime.bundle import Bundle
    bundle = Bundle.load(a.bundle)
    data = a.data
    if data is None:
        vocab = bundle.spec["vocab_size"]
        data = np.random.default_rng(0).integers(3, vocab, (a.samples + a.check_windows + 1) * a.seq_len)
    method = {"int4_weights": a.method} if a.scheme == "w4a16" else {"weight_method": a.method}
    cfg = CalibConfig(scheme=a.scheme, samples=a.samples, seq_len=a.seq_len, check_windows=a.check_windows,
                      keep_fp=None, threads=a.threads, progress=not a.quiet, force=True,
                      layers_per_pass=a.layers_per_pass, compute=a.compute, device=a.device, **method)
    sampler = RssSampler()
    t0 = time.perf_counter()
    manifest = calibrate_bundle(a.bundle, data, a.out, cfg)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    timeline = sampler.done()
    calib = json.loads((Path(a.out) / "calibration.json").read_text())
    result = {"method": a.method, "scheme": a.scheme, "seconds": round(seconds, 1), "peak_rss_bytes": peak,
              "source_weights_bytes": bundle.manifest["weights"]["bytes"],
              "peak_over_weights": round(peak / bundle.manifest["weights"]["bytes"], 3),
              "stages": calib["seconds"], "passes": calib["data"].get("passes"),
              "check_passes": (calib.get("check") or {}).get("passes"),
              "check": manifest["quantization"]["check"], "weights_bytes": manifest["weights"]["bytes"],
              "compute": calib["config"].get("compute"),
              "rss_timeline_gib": [(t, round(r / 2 ** 30, 2)) for t, r in timeline[:: max(1, len(timeline) // 60)]],
              "peak_at_seconds": max(timeline, key=lambda x: x[1])[0] if timeline else None}
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.max_memory_allocated():
            result["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    except ImportError:
        pass
    result.update(load_check(a.out, bundle.spec["vocab_size"], a.threads, a.device))
    return result


def load_check(out: str, vocab: int, threads: int | None, device: str) -> dict:
    """Load the quantized bundle with the runtime (the ONNX Runtime flavor when it has one) and generate
    8 greedy tokens from 16 random ids."""
    import numpy as np
    from ardeploy.runtime import Generator, SamplingConfig
    reset_peak_rss()
    t0 = time.perf_counter()
    gen = Generator.load(out, backend="ort", threads=threads, device=device)
    ids = np.random.default_rng(1).integers(3, vocab, 16).tolist()
    result = gen.generate(ids, SamplingConfig(greedy=True, max_new_tokens=8, ignore_eos=True))
    return {"load_check_seconds": round(time.perf_counter() - t0, 1), "load_check_tokens": result.token_ids,
            "load_check_peak_rss_bytes": peak_rss_bytes()}


def make_bundle(bundle: Path, shape: str) -> None:
    """BUNDLE from scripts/gpu_shapes.py's SHAPE (fp16 random weights), unless it exists."""
    if (bundle / "manifest.json").is_file():
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from gpu_shapes import build
    from ardeploy.export.bundle import export_path
    hf = bundle.parent / f"{bundle.name}-hf"
    t0 = time.perf_counter()
    build(shape, hf, "cuda" if torch.cuda.is_available() else "cpu", "fp16")
    try:
        export_path(str(hf), bundle, dtype="fp16", max_seq=1024, quiet=True)
    finally:
        shutil.rmtree(hf, ignore_errors=True)
    print(f"{bundle}: {shape} exported in {time.perf_counter() - t0:.0f} s", flush=True)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("bundle")
    ap.add_argument("--methods", default="rtn,awq,awq-gptq", help="comma-separated weight methods")
    ap.add_argument("--scheme", default="w4a16", choices=["w4a16", "w8a16"])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--check-windows", type=int, default=4)
    ap.add_argument("--data", help="calibration text (default: random token ids)")
    ap.add_argument("--compute", default="auto", help="auto | numpy | torch | cuda (calibration/compute.py)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where ONNX Runtime runs the score graph")
    ap.add_argument("--layers-per-pass", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--shape", help="make BUNDLE from this scripts/gpu_shapes.py shape first if it does not exist")
    ap.add_argument("--keep", help="keep the quantized bundles in this folder")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return 0
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    allowed = INT4 if a.scheme == "w4a16" else INT8
    if a.shape:
        make_bundle(Path(a.bundle), a.shape)
    bad = [m for m in methods if m not in allowed]
    if bad or not Path(a.bundle, "manifest.json").is_file():
        print(f"quantize_memory.py: {'unknown method ' + bad[0] if bad else a.bundle + ': not a bundle'}", file=sys.stderr)
        return 2
    keep = Path(a.keep) if a.keep else None
    work = Path(tempfile.mkdtemp(prefix="quantize_memory-", dir=keep or Path(a.bundle).resolve().parent))
    results = []
    try:
        for m in methods:
            out = (keep or work) / f"{Path(a.bundle).name}-{a.scheme}-{m}"
            args = [sys.executable, __file__, a.bundle, "--child", "--method", m, "--out", str(out),
                    "--scheme", a.scheme, "--samples", str(a.samples), "--seq-len", str(a.seq_len),
                    "--check-windows", str(a.check_windows), "--compute", a.compute, "--device", a.device]
            args += ["--data", a.data] if a.data else []
            args += ["--layers-per-pass", str(a.layers_per_pass)] if a.layers_per_pass else []
            args += ["--threads", str(a.threads)] if a.threads else []
            args += ["--quiet"] if a.quiet or a.json else []
            proc = subprocess.run(args, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not lines:
                results.append({"method": m, "failed": proc.returncode})
            else:
                results.append(json.loads(lines[-1][len("RESULT "):]))
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
            report(results[-1], a.json)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    if a.json:
        print(json.dumps(results, indent=1))
    return 1 if any("failed" in r for r in results) else 0


def report(r: dict, quiet: bool) -> None:
    if quiet:
        return
    if "failed" in r:
        print(f"{r['method']}: FAILED (exit {r['failed']})", flush=True)
        return
    gib = 2 ** 30
    gpu = f", GPU peak {r['gpu_peak_bytes'] / gib:.1f} GiB" if r.get("gpu_peak_bytes") else ""
    print(f"{r['scheme']} {r['method']}: {r['seconds']:.0f} s, peak RSS {r['peak_rss_bytes'] / gib:.2f} GiB = "
          f"{r['peak_over_weights']:.2f}x the {r['source_weights_bytes'] / gib:.2f} GiB of weights{gpu}; "
          f"stages {r['stages']}; passes {r['passes']}, check {r['check_passes']}; check ratio {(r['check'] or {}).get('ratio')}; "
          f"load + 8 tokens {r['load_check_seconds']} s, peak {r['load_check_peak_rss_bytes'] / gib:.2f} GiB "
          f"-> {r['load_check_tokens']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
