"""The method table of docs/CALIBRATION.md: perplexity ratio to the FP bundle for every scheme and
method, statistics collected once per SmoothQuant alpha and shared by all methods. Run from a
checkout (with the package installed):

    python scripts/calibration_table.py BUNDLE --data calib.txt --eval eval.txt \\
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

from ardeploy.calibration.data import load_stream
from ardeploy.calibration.quantize import CalibConfig, Calibrator
from ardeploy.calibration.sensitivity import search_keep_fp
from ardeploy.calibration.stats import METHODS
from ardeploy.runtime.bundle import Bundle
from ardeploy.runtime.log import log


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python scripts/calibration_table.py")
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
    return ap.parse_args(argv)


def alpha_of(text: str) -> float | None:
    return None if text.strip() == "off" else float(text)


class Table:
    """Rows as they are measured: logged, and the JSON file (if any) rewritten after each one."""

    def __init__(self, fp_ppl: float, eval_tokens: int, json_path: str | None):
        self.fp_ppl, self.eval_tokens, self.json_path = fp_ppl, eval_tokens, json_path
        self.rows: list[dict] = []

    def add(self, scheme, method, alpha, weight_method, ppl, keep=()) -> None:
        r = {"scheme": scheme, "method": method, "smoothquant_alpha": alpha, "weight_method": weight_method,
             "ratio": round(ppl / self.fp_ppl, 5), "ppl": round(ppl, 4), "kept_fp_layers": list(keep)}
        self.rows.append(r)
        log.info(json.dumps(r))
        if self.json_path:
            with open(self.json_path, "w") as f:
                json.dump({"fp_ppl": self.fp_ppl, "eval_tokens": self.eval_tokens, "rows": self.rows}, f, indent=1)

    def markdown(self) -> str:
        out = [f"FP perplexity {self.fp_ppl:.4f} on {self.eval_tokens} tokens", "",
               "| scheme | activation method | SmoothQuant alpha | weights | layers kept in FP | ppl | ratio to FP |",
               "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            alpha = "off" if r["smoothquant_alpha"] is None else r["smoothquant_alpha"]
            if r["scheme"] == "w8a16":
                alpha = "-"
            kept = f"{len(r['kept_fp_layers'])} {r['kept_fp_layers']}" if r["kept_fp_layers"] else "0"
            out.append(f"| {r['scheme']} | {r['method']} | {alpha} | {r['weight_method']} | {kept} | "
                       f"{r['ppl']:.4f} | {r['ratio']:.4f} |")
        return "\n".join(out)


def calibrator(bundle: Bundle, a, **config) -> Calibrator:
    cal = Calibrator(bundle, CalibConfig(samples=a.samples, seq_len=a.seq_len, threads=a.threads, **config))
    cal.load_data(a.data)
    return cal


def w8a8_rows(table: Table, cal: Calibrator, a, windows: np.ndarray, chmax: dict, first_alpha: bool) -> None:
    """Every activation method with round-to-nearest weights; for the first alpha also MSE-clipped
    and GPTQ weights (with --method mse) and, with --keep-fp, the layers the search keeps."""
    cal.choose_smoothing(chmax)
    hists = cal.collect_histograms()
    alpha = cal.cfg.smoothquant_alpha
    for wm in ("max", "mse", "gptq") if first_alpha else ("max",):
        cal.cfg.weight_method = wm
        for method in (METHODS if wm == "max" else ("mse",)):
            cal.cfg.method = method
            cal.set_activation_scales(chmax, hists)
            ppl = cal.perplexity(cal.quant_plan(cal.source.layers), f"w8a8 {method} alpha {alpha} weights {wm}",
                                 windows)
            table.add("w8a8", method, alpha, wm, ppl)
            if a.keep_fp and first_alpha and wm == "max" and ppl / table.fp_ppl > cal.cfg.bound:
                keep_fp_row(table, cal, windows)


def keep_fp_row(table: Table, cal: Calibrator, windows: np.ndarray) -> None:
    """What `--keep-fp auto` does: sensitivity on held-out calibration windows, then the fewest
    most sensitive layers kept in FP that meet the bound there."""
    check_base = cal.perplexity(None, "check fp")
    keep, _ = search_keep_fp(cal, check_base, cal.perplexity(cal.quant_plan(cal.source.layers), "check"))
    ppl = cal.perplexity(cal.quant_plan(cal.units_to_quantize(set(keep))), f"keep {len(keep)}", windows)
    table.add("w8a8", cal.cfg.method, cal.cfg.smoothquant_alpha, cal.cfg.weight_method, ppl, keep)


def main(argv=None) -> int:
    a = parse_args(argv)
    t_all = time.perf_counter()
    bundle = Bundle.load(a.bundle)
    stream, _ = load_stream(bundle, a.eval)
    n = min(a.eval_windows, len(stream) // a.seq_len)
    windows = stream[: n * a.seq_len].reshape(n, a.seq_len)
    alphas = [alpha_of(t) for t in a.alphas.split(",")]
    table = chmax = hessians = None
    for alpha in alphas:
        cal = calibrator(bundle, a, scheme="w8a8", method="max", smoothquant_alpha=alpha, weight_method="gptq",
                         check_windows=4, percentile=a.percentile)
        if table is None:
            fp_ppl = cal.perplexity(None, "fp", windows)
            log.info(f"fp ppl {fp_ppl:.4f} on {windows.size} tokens")
            table = Table(fp_ppl, int(windows.size), a.json)
        if chmax is None:        # per-channel max and X^T X (GPTQ rows) do not depend on alpha: collect once
            chmax = cal.collect_channel_max()
            hessians = cal.hessians
        cal.hessians = hessians
        w8a8_rows(table, cal, a, windows, chmax, first_alpha=alpha == alphas[0])
    for wm in ("max", "mse", "gptq"):
        cal = calibrator(bundle, a, scheme="w8a16", weight_method=wm, check_windows=0)
        cal.hessians = hessians
        table.add("w8a16", "-", None, wm, cal.perplexity(cal.quant_plan(cal.source.layers), f"w8a16 {wm}", windows))
    log.info(f"total {time.perf_counter() - t_all:.0f} s")
    print(table.markdown())
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
