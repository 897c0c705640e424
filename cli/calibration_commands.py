"""`ardeploy calibrate` and `ardeploy eval`: INT8 / INT4 bundles and their perplexity."""
from __future__ import annotations

import json
import time

from .errors import UserError
from .options import add_device, add_json, add_out_force, add_threads, add_verbosity


def _keep_fp(value: str):
    v = value.strip().lower()
    if v == "auto":
        return "auto"
    if v in ("none", ""):
        return None
    try:
        return sorted({int(x) for x in v.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--keep-fp {value!r}: give auto, none, or comma-separated layer numbers") from None


def _alpha(value: str):
    if value.strip().lower() in ("off", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise UserError(f"--smoothquant-alpha {value!r}: give a number in [0, 1] or 'off'") from None


def calib_config(args):
    """The CalibConfig the calibrate command's options describe."""
    from ardeploy.calibration.quantize import CalibConfig
    targets = ",".join(args.compute_capability or ["SM89"]).split(",")
    return CalibConfig(scheme=args.scheme, method=args.method, percentile=args.percentile,
                       smoothquant_alpha=_alpha(args.smoothquant_alpha), samples=args.samples, seq_len=args.seq_len,
                       weight_method=args.weight_method, keep_fp=_keep_fp(args.keep_fp),
                       quantize_head=args.quantize_head, block_size=args.block_size, int4_weights=args.weights,
                       max_ppl_ratio=args.max_ppl_ratio,
                       check_windows=args.check_windows, check_data=args.check_data, reuse_stats=args.reuse_stats,
                       target=args.target, compute_capabilities=tuple(c.strip().upper() for c in targets if c.strip()),
                       threads=args.threads, progress=not args.quiet, force=args.force, compute=args.compute,
                       device=args.device or "cpu", layers_per_pass=args.layers_per_pass)


def cmd_calibrate(args) -> int:
    from ardeploy.calibration.quantize import calibrate_bundle
    cfg = calib_config(args)
    started = time.perf_counter()
    manifest = calibrate_bundle(args.bundle, args.data, args.out, cfg)
    print(_calibration_summary(manifest, time.perf_counter() - started, args.out))
    quant = manifest["quantization"]
    if "tensorrt_rtx_build" in quant:
        built = quant["tensorrt_rtx_build"]
        kinds = [k for k in built if isinstance(built[k], dict)]
        print(f"TensorRT-RTX {built['tensorrt_rtx']}: built {', '.join(kinds)} ahead of time for "
              f"{', '.join(built[kinds[0]]['compute_capabilities'])}" if kinds else "")
    return 0


def _calibration_summary(manifest: dict, seconds: float, out) -> str:
    quant = manifest["quantization"]
    acts = quant["activations"]
    wq = quant["weights"]
    how = "weights only" if acts is None else (
        f"activations {acts['method']}" + (f" {acts['percentile']}" if acts.get("percentile") else "") +
        (f", SmoothQuant alpha {acts['smoothquant_alpha']}" if acts["smoothquant_alpha"] is not None
         else ", no SmoothQuant"))
    check = quant.get("check")
    check_txt = (f"; check perplexity ratio {check['ratio']:.4f} on {check['windows']} held-out windows "
                 f"(bound {check['bound']})") if check else ""
    kept = quant["kept_fp_layers"]
    if wq["dtype"] == "int4":
        how += f", {wq['method']}, blocks of {wq['block_size']}"
    return (f"calibrated {quant['scheme']} ({how}): {len(quant['quantized_layers'])} layers {wq['dtype'].upper()}, "
            f"{len(kept)} kept in {manifest['dtype']}{' ' + str(kept) if kept else ''}"
            f"{check_txt}; weights {manifest['weights']['bytes'] / 2**20:.1f} MiB held once "
            f"(was {quant['source_bundle']['weights_bytes'] / 2**20:.1f}); {seconds:.1f} s -> {out}")


def cmd_eval(args) -> int:
    from ardeploy.calibration.data import load_stream
    from ardeploy.calibration.evaluate import bundle_perplexity
    from ardeploy.runtime.bundle import Bundle
    bundle = Bundle.load(args.bundle)
    stream, docs = load_stream(bundle, args.ppl)
    if args.max_tokens is not None:
        if args.max_tokens < 2:
            raise UserError(f"--max-tokens must be at least 2 (got {args.max_tokens})")
        stream = stream[: args.max_tokens]
    stride = args.stride if args.stride is not None else max(1, args.seq_len // 2)
    res = {"bundle": str(args.bundle), "file": str(args.ppl), "documents": docs,
           **bundle_perplexity(bundle, stream, args.seq_len, stride, args.threads, progress=not args.quiet,
                                 device=args.device or "cpu")}
    q = bundle.manifest.get("quantization")
    res["quantization"] = q["scheme"] if q else None
    if args.reference:
        ref = Bundle.load(args.reference)
        if ref.vocab_size != bundle.vocab_size:
            raise UserError(f"{args.reference}: vocabulary differs from {args.bundle}'s")
        ref_res = bundle_perplexity(ref, stream, args.seq_len, stride, args.threads, progress=not args.quiet,
                                    device=args.device or "cpu")
        res["reference"] = {"bundle": str(args.reference), "ppl": ref_res["ppl"], "seconds": ref_res["seconds"]}
        res["ratio"] = res["ppl"] / ref_res["ppl"]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        line = (f"perplexity {res['ppl']:.4f} over {res['scored_tokens']} tokens ({res['windows']} windows of "
                f"{args.seq_len}, stride {stride}) in {res['seconds']:.1f} s, {res['tokens_per_s']} tok/s")
        if args.reference:
            line += f"; reference {res['reference']['ppl']:.4f}, ratio {res['ratio']:.4f}"
        print(line)
    return 0


def register(sub) -> None:
    _register_calibrate(sub)
    _register_eval(sub)


def _register_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="INT8/INT4 quantization: calibrate a bundle and write Q/DQ graphs into a new bundle",
        description="Writes a new bundle whose prefill/decode/score graphs carry QuantizeLinear/DequantizeLinear "
                    "pairs (explicit quantization, as TensorRT and ONNX Runtime consume it). w8a16: INT8 weights "
                    "(per output channel). w8a8: INT8 weights and activations (static per-tensor scales from "
                    "running the score graph on --data), with SmoothQuant. w4a16: INT4 weights, one scale per "
                    "block of input channels (blocked DequantizeLinear, TensorRT's weight-only INT4 pattern).")
    p.add_argument("bundle", help="FP bundle (from ardeploy export)")
    p.add_argument("--data", required=True,
                   help="calibration text: a text file (documents separated by blank lines) or .jsonl with a 'text' field")
    from ardeploy.calibration.schemes import SCHEMES
    p.add_argument("--scheme", required=True, choices=list(SCHEMES),
                   help="w8a16: INT8 weights; w8a8: INT8 weights and activations; w4a16: INT4 weights in blocks")
    p.add_argument("--block-size", type=int, default=32, choices=[16, 32, 64, 128],
                   help="w4a16: input channels sharing one scale")
    p.add_argument("--weights", default="awq-gptq", choices=["rtn", "awq", "gptq", "awq-gptq"],
                   help="w4a16: round to nearest (absmax scales, no data needed), AWQ (activation-aware factors "
                        "folded into the previous norm or linear, and clipping), GPTQ rounding, or AWQ's factors "
                        "then GPTQ's rounding (the default: best measured; all but rtn use the data's X^T X)")
    p.add_argument("--method", default="mse", choices=["max", "percentile", "entropy", "mse"],
                   help="activation threshold method (w8a8)")
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile")
    p.add_argument("--smoothquant-alpha", default="0.7", help="SmoothQuant migration strength in [0, 1], or 'off' (w8a8)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--weight-method", default="max", choices=["max", "mse", "gptq"],
                   help="w8a16/w8a8: INT8 weights, per output channel: max (absmax scale, round to nearest), "
                        "mse (per-channel "
                        "clipping that minimizes the squared error), gptq (absmax scale, GPTQ rounding with the "
                        "calibration data's Hessians)")
    p.add_argument("--keep-fp", default="auto",
                   help="layers to leave unquantized: auto (w8a8, w4a16: the most sensitive ones, if the held-out "
                        "check "
                        "misses --max-ppl-ratio), none, or e.g. 0,29")
    p.add_argument("--max-ppl-ratio", type=float, default=None,
                   help="perplexity bound vs the FP bundle for --keep-fp auto (default 1.05 for w8a8, 1.08 for w4a16)")
    p.add_argument("--check-windows", type=int, default=4,
                   help="held-out windows (of --data beyond --samples, or of --check-data) for the perplexity check; 0: none")
    p.add_argument("--check-data", help="text for the perplexity check instead of left-over calibration windows")
    p.add_argument("--reuse-stats", metavar="CALIBRATION_JSON",
                   help="take activation statistics from an earlier calibration.json (same bundle, data and alpha)")
    p.add_argument("--quantize-head", action="store_true",
                   help="also quantize the LM head (and, when tied, the embedding table it shares): INT8 per output channel for w8a16/w8a8; for w4a16 8-bit blocks of --block-size (a 4-bit head costs accuracy)")
    p.add_argument("--target", choices=["trt-rtx"], default=None,
                   help="also build prefill/decode with TensorRT-RTX ahead of time on this machine and refuse what it cannot build")
    p.add_argument("--compute-capability", action="append", metavar="SM89",
                   help="TensorRT-RTX targets for --target (repeatable or comma-separated; default SM89)")
    p.add_argument("--compute", default="auto", choices=["auto", "numpy", "torch", "cuda"],
                   help="where the weight arithmetic (RTN, AWQ, GPTQ) runs: numpy, torch on the CPU, or torch on a CUDA "
                        "GPU (auto: cuda when torch sees a GPU, else numpy; round to nearest is bit-identical everywhere)")
    p.add_argument("--layers-per-pass", type=int, default=None,
                   help="decoder layers per run of the score graph (default: as many as fit 4 GiB; models that fit run "
                        "whole, bigger ones a few layers at a time, holding one pass's weights and X^T X)")
    add_device(p, cuda_graph=False)
    add_threads(p)
    add_out_force(p, "new bundle folder")
    add_verbosity(p)
    p.set_defaults(func=cmd_calibrate)


def _register_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a bundle on a text file (sliding window, score graph)",
                              description="Perplexity with a sliding window: every window runs the score graph once "
                                          "(logits for all positions); each token is scored once.")
    p.add_argument("bundle")
    p.add_argument("--ppl", required=True, metavar="FILE", help="text file (blank-line-separated documents) or .jsonl")
    p.add_argument("--seq-len", type=int, default=512, help="window length")
    p.add_argument("--stride", type=int, default=None, help="window step (default: seq-len / 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--reference", metavar="BUNDLE", help="also evaluate this bundle and print the ratio")
    add_threads(p)
    add_device(p, cuda_graph=False)
    add_json(p, "the perplexity report")
    add_verbosity(p)
    p.set_defaults(func=cmd_eval)
