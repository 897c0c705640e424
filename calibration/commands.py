"""`ardeploy calibrate` and `ardeploy eval` (registered by scripts/cli.py)."""
from __future__ import annotations

import json
import sys
import time


def _keep_fp(value: str):
    v = value.strip().lower()
    if v == "auto":
        return "auto"
    if v in ("none", ""):
        return None
    try:
        return sorted({int(x) for x in v.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--keep-fp {value!r}: give auto, none, or comma-separated layer numbers") from None


def _alpha(value: str):
    if value.strip().lower() in ("off", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--smoothquant-alpha {value!r}: give a number in [0, 1] or 'off'") from None


def cmd_calibrate(a) -> int:
    from .quantize import CalibConfig, calibrate_bundle
    ccs = tuple(c.strip().upper() for c in ",".join(a.compute_capability or ["SM89"]).split(",") if c.strip())
    cfg = CalibConfig(scheme=a.scheme, method=a.method, percentile=a.percentile,
                      smoothquant_alpha=_alpha(a.smoothquant_alpha), samples=a.samples, seq_len=a.seq_len,
                      weight_method=a.weight_method, keep_fp=_keep_fp(a.keep_fp), quantize_head=a.quantize_head,
                      max_ppl_ratio=a.max_ppl_ratio, check_windows=a.check_windows, check_data=a.check_data,
                      reuse_stats=a.reuse_stats, target=a.target, compute_capabilities=ccs, threads=a.threads,
                      progress=not a.quiet, force=a.force)
    t = time.perf_counter()
    m = calibrate_bundle(a.bundle, a.data, a.out, cfg)
    q = m["quantization"]
    acts = q["activations"]
    how = "weights only" if acts is None else (
        f"activations {acts['method']}" + (f" {acts['percentile']}" if acts.get("percentile") else "") +
        (f", SmoothQuant alpha {acts['smoothquant_alpha']}" if acts["smoothquant_alpha"] is not None else ", no SmoothQuant"))
    check = q.get("check")
    check_txt = (f"; check perplexity ratio {check['ratio']:.4f} on {check['windows']} held-out windows "
                 f"(bound {check['bound']})") if check else ""
    print(f"calibrated {q['scheme']} ({how}): {len(q['quantized_layers'])} layers INT8, "
          f"{len(q['kept_fp_layers'])} kept in {m['dtype']}{' ' + str(q['kept_fp_layers']) if q['kept_fp_layers'] else ''}"
          f"{check_txt}; weights {m['weights']['bytes'] / 2**20:.1f} MiB held once "
          f"(was {q['source_bundle']['weights_bytes'] / 2**20:.1f}); {time.perf_counter() - t:.1f} s -> {a.out}")
    if "tensorrt_rtx_build" in q:
        b = q["tensorrt_rtx_build"]
        kinds = [k for k in b if isinstance(b[k], dict)]
        print(f"TensorRT-RTX {b['tensorrt_rtx']}: built {', '.join(kinds)} ahead of time for "
              f"{', '.join(b[kinds[0]]['compute_capabilities'])}" if kinds else "")
    return 0


def cmd_eval(a) -> int:
    from ..runtime.bundle import Bundle
    from .data import load_stream
    from .evaluate import bundle_perplexity
    bundle = Bundle.load(a.bundle)
    stream, docs = load_stream(bundle, a.ppl)
    if a.max_tokens:
        stream = stream[: a.max_tokens]
    stride = a.stride if a.stride else max(1, a.seq_len // 2)
    res = {"bundle": str(a.bundle), "file": str(a.ppl), "documents": docs,
           **bundle_perplexity(bundle, stream, a.seq_len, stride, a.threads, progress=not a.quiet)}
    q = bundle.manifest.get("quantization")
    res["quantization"] = q["scheme"] if q else None
    if a.reference:
        ref = Bundle.load(a.reference)
        if ref.vocab_size != bundle.vocab_size:
            raise ValueError(f"{a.reference}: vocabulary differs from {a.bundle}'s")
        r = bundle_perplexity(ref, stream, a.seq_len, stride, a.threads, progress=not a.quiet)
        res["reference"] = {"bundle": str(a.reference), "ppl": r["ppl"], "seconds": r["seconds"]}
        res["ratio"] = res["ppl"] / r["ppl"]
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        line = (f"perplexity {res['ppl']:.4f} over {res['scored_tokens']} tokens ({res['windows']} windows of "
                f"{a.seq_len}, stride {stride}) in {res['seconds']:.1f} s, {res['tokens_per_s']} tok/s")
        if a.reference:
            line += f"; reference {res['reference']['ppl']:.4f}, ratio {res['ratio']:.4f}"
        print(line)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="INT8 quantization: calibrate a bundle and write Q/DQ graphs into a new bundle",
        description="Writes a new bundle whose prefill/decode/score graphs carry QuantizeLinear/DequantizeLinear "
                    "pairs (explicit quantization, as TensorRT and ONNX Runtime consume it). w8a16: INT8 weights "
                    "(per output channel). w8a8: INT8 weights and activations (static per-tensor scales from "
                    "running the score graph on --data), with SmoothQuant.")
    p.add_argument("bundle", help="FP bundle (from ardeploy export)")
    p.add_argument("--data", required=True,
                   help="calibration text: a text file (documents separated by blank lines) or .jsonl with a 'text' field")
    p.add_argument("--scheme", required=True, choices=["w8a16", "w8a8"])
    p.add_argument("--method", default="mse", choices=["max", "percentile", "entropy", "mse"],
                   help="activation threshold method (w8a8)")
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile")
    p.add_argument("--smoothquant-alpha", default="0.7", help="SmoothQuant migration strength in [0, 1], or 'off' (w8a8)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--weight-method", default="max", choices=["max", "mse", "gptq"],
                   help="INT8 weights, per output channel: max (absmax scale, round to nearest), mse (per-channel "
                        "clipping that minimizes the squared error), gptq (absmax scale, GPTQ rounding with the "
                        "calibration data's Hessians)")
    p.add_argument("--keep-fp", default="auto",
                   help="layers to leave unquantized: auto (w8a8: the most sensitive ones, if the held-out check "
                        "misses --max-ppl-ratio), none, or e.g. 0,29")
    p.add_argument("--max-ppl-ratio", type=float, default=None,
                   help="perplexity bound vs the FP bundle for --keep-fp auto (default 1.05 for w8a8)")
    p.add_argument("--check-windows", type=int, default=4,
                   help="held-out windows (of --data beyond --samples, or of --check-data) for the perplexity check; 0: none")
    p.add_argument("--check-data", help="text for the perplexity check instead of left-over calibration windows")
    p.add_argument("--reuse-stats", metavar="CALIBRATION_JSON",
                   help="take activation statistics from an earlier calibration.json (same bundle, data and alpha)")
    p.add_argument("--quantize-head", action="store_true",
                   help="also quantize the LM head (and, when tied, the embedding table it shares)")
    p.add_argument("--target", choices=["trt-rtx"], default=None,
                   help="also build prefill/decode with TensorRT-RTX ahead of time on this machine and refuse what it cannot build")
    p.add_argument("--compute-capability", action="append", metavar="SM89",
                   help="TensorRT-RTX targets for --target (repeatable or comma-separated; default SM89)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores)")
    p.add_argument("--out", required=True, help="new bundle folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_calibrate)

    p = subparsers.add_parser("eval", help="perplexity of a bundle on a text file (sliding window, score graph)",
                              description="Perplexity with a sliding window: every window runs the score graph once "
                                          "(logits for all positions); each token is scored once.")
    p.add_argument("bundle")
    p.add_argument("--ppl", required=True, metavar="FILE", help="text file (blank-line-separated documents) or .jsonl")
    p.add_argument("--seq-len", type=int, default=512, help="window length")
    p.add_argument("--stride", type=int, default=None, help="window step (default: seq-len / 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--reference", metavar="BUNDLE", help="also evaluate this bundle and print the ratio")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_eval)
