"""The engine subcommands: `build`, `inspect`, `compare` (registered by scripts/cli.py)."""
from __future__ import annotations

import json
import sys


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_build(a) -> int:
    from .builder import PLAN_RULE, build_engines
    ccs = [c for part in (a.compute_capability or []) for c in part.split(",") if c.strip()]
    rec = build_engines(a.bundle, a.precision, max_seq=a.max_seq, max_batch=a.max_batch, opt_seq=a.opt_seq,
                        trt=a.trt, timing_cache=a.timing_cache, workspace=a.workspace, compute_capability=ccs or None,
                        opt_level=a.opt_level, quiet=a.quiet, verbose=a.verbose)
    if a.json:
        print(json.dumps(rec, indent=2))
        return 0
    w = rec["weights"]["bytes"]
    target = rec["target"]
    where = "any supported GPU" if target["compute_capability"] == "any" else \
        f"{target['gpu']} (compute capability {target['compute_capability']})"
    print(f"built {a.bundle}/engines/{rec['engines'][0]['file']} ({rec['precision']}, {rec['tensorrt']['label']}, "
          f"{where}) in {rec['build_seconds']:.1f} s: plan {_mib(rec['plan_bytes'])} = "
          f"{rec['plan_to_weights']:.3f} x the weights ({_mib(w)})")
    if rec["plan_to_weights"] >= PLAN_RULE and w >= 64 * 2**20:     # tiny models: fixed overhead dominates
        print(f"warning: the plan holds {rec['plan_to_weights']:.2f} x the weight bytes (target: under {PLAN_RULE} x)",
              file=sys.stderr)
    return 0


def cmd_inspect(a) -> int:
    from .inspect import inspect_bundle, render
    rep = inspect_bundle(a.bundle, layers=a.layers)
    print(json.dumps(rep, indent=2) if a.json else render(rep))
    return 0


def cmd_compare(a) -> int:
    from .compare import compare_bundle
    rep = compare_bundle(a.bundle, prompt_len=a.prompt_len, decode_steps=a.steps, atol=a.atol, rtol=a.rtol,
                         seed=a.seed)
    if a.json:
        print(json.dumps(rep, indent=2))
    else:
        for c in rep["cases"]:
            status = "ok" if c["passed"] else "FAILED"
            print(f"  {c['name']:<28} max |d logits| {c['max_abs_logits']:.3g}   max |d kv| {c['max_abs_kv']:.3g}   {status}")
    return 0 if rep["passed"] else 1


def register(sub) -> None:
    p = sub.add_parser("build", help="bundle -> TensorRT engine (one engine, prefill and decode profiles)",
                       description="Builds one strongly typed TensorRT engine from the bundle's decode graph, with a "
                                   "prefill and a decode optimization profile, so the weights are held once. The "
                                   "engine's precision is the graph's: build an fp16 engine from an fp16 bundle, and an int8 engine "
                                   "from a bundle made by `ardeploy calibrate` (its Q/DQ pairs say what runs in INT8).")
    p.add_argument("bundle")
    p.add_argument("--precision", required=True, metavar="{fp16,bf16,fp32,int8}",
                   help="the bundle's dtype (ardeploy export --dtype), or int8 for a calibrated bundle")
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
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--verbose", action="store_true", help="print TensorRT's warnings")
    p.add_argument("--json", action="store_true", help="print engines.json")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("inspect", help="show a bundle's engines: profiles, layers and precisions, sizes")
    p.add_argument("bundle")
    p.add_argument("--layers", action="store_true", help="list every layer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)
