"""`ardeploy build`, `inspect` and `compare`: TensorRT engines for a bundle."""
from __future__ import annotations

import json
import sys

from .options import add_json, add_verbosity


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_build(args) -> int:
    from ardeploy.engines.builder import PLAN_RULE, build_engines
    targets = [c for part in (args.compute_capability or []) for c in part.split(",") if c.strip()]
    record = build_engines(args.bundle, args.precision, max_seq=args.max_seq, max_batch=args.max_batch,
                           opt_seq=args.opt_seq, trt=args.trt, timing_cache=args.timing_cache,
                           workspace=args.workspace, compute_capability=targets or None, opt_level=args.opt_level,
                           quiet=args.quiet, verbose=args.verbose > 0)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    weights = record["weights"]["bytes"]
    target = record["target"]
    where = "any supported GPU" if target["compute_capability"] == "any" else \
        f"{target['gpu']} (compute capability {target['compute_capability']})"
    print(f"built {args.bundle}/engines/{record['engines'][0]['file']} ({record['precision']}, "
          f"{record['tensorrt']['label']}, {where}) in {record['build_seconds']:.1f} s: plan "
          f"{_mib(record['plan_bytes'])} = {record['plan_to_weights']:.3f} x the weights ({_mib(weights)})")
    if record["plan_to_weights"] >= PLAN_RULE and weights >= 64 * 2**20:     # tiny models: fixed overhead dominates
        print(f"warning: the plan holds {record['plan_to_weights']:.2f} x the weight bytes "
              f"(target: under {PLAN_RULE} x)", file=sys.stderr)
    return 0


def cmd_inspect(args) -> int:
    from ardeploy.engines.inspect import inspect_bundle, render
    report = inspect_bundle(args.bundle, layers=args.layers)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def cmd_compare(args) -> int:
    from ardeploy.engines.compare import compare_bundle
    report = compare_bundle(args.bundle, prompt_len=args.prompt_len, decode_steps=args.steps, atol=args.atol,
                            rtol=args.rtol, seed=args.seed)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for c in report["cases"]:
            status = "ok" if c["passed"] else "FAILED"
            print(f"  {c['name']:<28} max |d logits| {c['max_abs_logits']:.3g}   max |d kv| {c['max_abs_kv']:.3g}   {status}")
    return 0 if report["passed"] else 1


def register(sub) -> None:
    _register_build(sub)
    _register_inspect(sub)
    _register_compare(sub)


def _register_build(sub) -> None:
    p = sub.add_parser("build", help="bundle -> TensorRT engine (one engine, prefill and decode profiles)",
                       description="Builds one strongly typed TensorRT engine from the bundle's decode graph, with a "
                                   "prefill and a decode optimization profile, so the weights are held once. The "
                                   "engine's precision is the graph's: build an fp16 engine from an fp16 bundle, and an int8 engine "
                                   "from a bundle made by `ardeploy calibrate` (its Q/DQ pairs say what runs in INT8), an int4 "
                                   "engine from a w4a16 one (INT4 weights, blocked DequantizeLinear).")
    p.add_argument("bundle")
    p.add_argument("--precision", required=True, metavar="{fp16,bf16,fp32,int8,int4}",
                   help="the bundle's dtype (ardeploy export --dtype), or int8 / int4 for a bundle calibrated with "
                        "w8a16 or w8a8 / w4a16")
    p.add_argument("--max-seq", type=int, default=None, help="longest sequence (default: the bundle's)")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch (default: the bundle's)")
    p.add_argument("--opt-seq", type=int, default=512, help="prompt length / cache length kernels are tuned for")
    p.add_argument("--trt", default="auto", choices=["auto", "tensorrt", "tensorrt_rtx"],
                   help="TensorRT flavour (auto: TensorRT if installed, else TensorRT-RTX)")
    p.add_argument("--compute-capability", action="append", metavar="CC",
                   help="TensorRT-RTX target(s), e.g. 8.9 or 8.6,12.0 (default: every GPU it supports)")
    p.add_argument("--timing-cache", help="TensorRT timing cache file, reused and updated "
                                          "(default: $ARDEPLOY_CACHE or ~/.cache/ardeploy)")
    p.add_argument("--workspace", help="builder workspace limit, e.g. 4GiB (default: TensorRT's)")
    p.add_argument("--opt-level", type=int, default=None, help="builder optimization level 0-5 (default: TensorRT's, 3)")
    add_json(p, "engines.json")
    add_verbosity(p, verbose_help="also print TensorRT's warnings")
    p.set_defaults(func=cmd_build)


def _register_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show a bundle's engines: profiles, layers and precisions, sizes")
    p.add_argument("bundle")
    p.add_argument("--layers", action="store_true", help="list every layer")
    add_json(p, "the engines' description")
    add_verbosity(p)
    p.set_defaults(func=cmd_inspect)


def _register_compare(sub) -> None:
    p = sub.add_parser("compare", help="ONNX Runtime vs TensorRT on the same inputs (polygraphy; needs a GPU)",
                       description="Runs the decode graph in ONNX Runtime and the engine in TensorRT on the same "
                                   "random prefill and decode inputs (through polygraphy) and compares logits and "
                                   "new K/V. Exit status 1 when they differ beyond the tolerances.")
    p.add_argument("bundle")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="decode steps to compare after the prefill")
    p.add_argument("--atol", type=float, default=None, help="default: 1e-3 for fp32, 5e-2 for fp16/bf16")
    p.add_argument("--rtol", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    add_json(p, "every case's differences")
    add_verbosity(p)
    p.set_defaults(func=cmd_compare)
