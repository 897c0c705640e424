"""The method table of docs/CALIBRATION.md: perplexity ratio to the FP bundle for every scheme and
method, statistics collected once per SmoothQuant alpha and shared by all methods.

    python -m ardeploy.calibration.table BUNDLE --data calib.txt --eval eval.txt \\
        [--samples 32] [--seq-len 512] [--eval-windows 32] [--alphas 0.5,0.7,off] [--json out.json]

Each row is what `ardeploy calibrate` + `ardeploy eval --stride SEQ_LEN` give for the same settings
(same windows, same code), without re-running the data for every row. Activation methods are
compared with round-to-nearest weights (`--weight-method max`, the default); the first alpha also
gets rows for the other weight methods.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from ..runtime.bundle import Bundle
from .data import load_stream
from .quantize import CalibConfig, Calibrator
from .stats import METHODS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ardeploy.calibration.table")
    ap.add_argument("bundle")
    ap.add_argument("--data", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--alphas", default="0.7,0.5,off")
    ap.add_argument("--percentile", type=float, default=99.99)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep-fp", action="store_true", help="run the --keep-fp auto search for rows that miss 1.05")
    a = ap.parse_args(argv)
    bundle = Bundle.load(a.bundle)
    stream, _ = load_stream(bundle, a.eval)
    n = min(a.eval_windows, len(stream) // a.seq_len)
    windows = stream[: n * a.seq_len].reshape(n, a.seq_len)
    rows, t_all = [], time.perf_counter()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    a_first = None if a.alphas.split(",")[0].strip() == "off" else float(a.alphas.split(",")[0])

    def row(scheme, method, alpha, weight_method, ratio, ppl, keep=()):
        r = {"scheme": scheme, "method": method, "smoothquant_alpha": alpha, "weight_method": weight_method,
             "ratio": round(ratio, 5), "ppl": round(ppl, 4), "kept_fp_layers": list(keep)}
        rows.append(r)
        log(json.dumps(r))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"fp_ppl": base, "eval_tokens": int(windows.size), "rows": rows}, f, indent=1)

    base = None
    chmax = hessians = None
    for alpha_txt in a.alphas.split(","):
        alpha = None if alpha_txt.strip() == "off" else float(alpha_txt)
        cfg = CalibConfig(scheme="w8a8", method="max", smoothquant_alpha=alpha, samples=a.samples,
                          seq_len=a.seq_len, weight_method="gptq", check_windows=4, threads=a.threads,
                          percentile=a.percentile)
        cal = Calibrator(bundle, cfg)
        cal.load_data(a.data)
        if base is None:
            base = cal.check_ppl(None, "fp", windows)
            log(f"fp ppl {base:.4f} on {windows.size} tokens")
        if chmax is None:        # per-channel max and X^T X (GPTQ rows) do not depend on alpha: collect once
            chmax = cal.collect_channel_max()
            hessians = cal.hessians
        cal.hessians = hessians
        cal.plan_smoothing(chmax)
        hists = cal.collect_histograms()
        weight_methods = ("max", "mse", "gptq") if alpha == a_first else ("max",)
        for wm in weight_methods:
            cal.cfg.weight_method = wm
            cal._layer_cache.clear()
            for method in (METHODS if wm == "max" else ("mse",)):
                cal.cfg.method = method
                cal.compute_act_scales(chmax, hists)
                ppl = cal.check_ppl(cal.plan(cal.layers), f"w8a8 {method} alpha {alpha} weights {wm}", windows)
                row("w8a8", method, alpha, wm, ppl / base, ppl)
                if a.keep_fp and alpha == a_first and wm == "max" and ppl / base > cal.cfg.bound:
                    # what `--keep-fp auto` does: sensitivity on held-out calibration windows, then the
                    # fewest most sensitive layers kept in FP that meet the bound there
                    check_base = cal.check_ppl(None, "check fp")
                    keep = cal.search_keep_fp(check_base, cal.check_ppl(cal.plan(cal.layers), "check"))
                    ppl = cal.check_ppl(cal.plan(cal.all_units(set(keep))), f"keep {len(keep)}", windows)
                    row("w8a8", method, alpha, wm, ppl / base, ppl, keep)

    for wm in ("max", "mse", "gptq"):
        cfg = CalibConfig(scheme="w8a16", weight_method=wm, samples=a.samples, seq_len=a.seq_len, check_windows=0,
                          threads=a.threads)
        cal = Calibrator(bundle, cfg)
        cal.load_data(a.data)
        cal.hessians = hessians
        ppl = cal.check_ppl(cal.plan(cal.layers), f"w8a16 {wm}", windows)
        row("w8a16", "-", None, wm, ppl / base, ppl)
    log(f"total {time.perf_counter() - t_all:.0f} s")
    print(markdown(rows, base, windows.size))
    return 0


def markdown(rows, base, tokens) -> str:
    out = [f"FP perplexity {base:.4f} on {tokens} tokens", "",
           "| scheme | activation method | SmoothQuant alpha | weights | layers kept in FP | ppl | ratio to FP |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        alpha = "off" if r["smoothquant_alpha"] is None else r["smoothquant_alpha"]
        if r["scheme"] == "w8a16":
            alpha = "-"
        kept = f"{len(r['kept_fp_layers'])} {r['kept_fp_layers']}" if r["kept_fp_layers"] else "0"
        out.append(f"| {r['scheme']} | {r['method']} | {alpha} | {r['weight_method']} | {kept} | {r['ppl']:.4f} | "
                   f"{r['ratio']:.4f} |")
    return "\n".join(out)


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
