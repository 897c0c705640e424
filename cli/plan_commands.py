"""`ardeploy plan`: a bundle's memory (weights, KV cache, activations; CPU and GPU) before loading it."""
from __future__ import annotations

import json

from .options import add_json, add_verbosity


def cmd_plan(args) -> int:
    from ardeploy.runtime.bundle import Bundle, device_numerics
    from ardeploy.runtime.memory_plan import parse_bytes, plan_memory, render
    bundle = Bundle.load(args.bundle)
    budget = parse_bytes(args.kv_budget) if args.kv_budget else None
    plans = [plan_memory(bundle, args.max_seq, args.batch, device, args.flavor, budget)
             for device in (["cpu", "cuda"] if args.device == "both" else [args.device])]
    numerics = device_numerics(bundle.manifest)          # a quantized bundle computes differently per device
    if args.json:
        out = [{**p.to_json(), "numerics": numerics.get(p.device)} for p in plans]
        print(json.dumps(out if len(out) > 1 else out[0], indent=2))
    else:
        print("\n".join(render(p) + (f"\n  numerics: {numerics[p.device]}" if p.device in numerics else "")
                        for p in plans))
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="a bundle's memory before loading it: weights, KV cache, activations, totals",
                       description="Prints what running the bundle holds in memory: its weights as ONNX Runtime keeps "
                                   "them, the KV cache at --max-seq x --batch (or the longest cache --kv-budget allows), "
                                   "an estimate of the activations, and the totals for the host and the GPU. Nothing is "
                                   "loaded: the manifest and the graph file are read.")
    p.add_argument("bundle")
    p.add_argument("--max-seq", type=int, default=None, help="cache length (default: the bundle's, or what --kv-budget fits)")
    p.add_argument("--batch", type=int, default=None, help="rows (default 1)")
    p.add_argument("--kv-budget", default=None, metavar="SIZE",
                   help="bytes the KV cache may take, e.g. 512MiB: max_seq becomes the longest cache that fits "
                        "(refused in one line when not even --max-seq / one position fits)")
    p.add_argument("--device", default="both", choices=["cpu", "cuda", "both"], help="where it would run (default: both)")
    p.add_argument("--flavor", default="auto", choices=["auto", "ort", "portable"], help="which graph the runtime runs")
    add_json(p, "the plan")
    add_verbosity(p)
    p.set_defaults(func=cmd_plan)
