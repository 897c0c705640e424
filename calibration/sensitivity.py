"""`--keep-fp auto` (w8a8 and w4a16): when the quantized model misses the perplexity bound on the check
windows, measure each layer's sensitivity (perplexity with only that layer quantized), then keep
the fewest most sensitive layers in FP that meet the bound (binary search over how many)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .run_state import CalibrationRun as Calibrator


def layer_sensitivity(cal: Calibrator, windows) -> tuple[float, dict[int, float]]:
    """(FP perplexity on `windows`, layer -> perplexity ratio with only that layer quantized)."""
    from tqdm import tqdm
    fp_ppl = cal.perplexity(None, "sensitivity: fp", windows)
    ratios = {}
    for layer in tqdm(cal.source.layers, desc="sensitivity", unit="layer", disable=not cal.cfg.progress, leave=False):
        ratios[layer] = cal.perplexity(cal.quant_plan([layer]), f"layer {layer}", windows) / fp_ppl
    return fp_ppl, ratios


def fewest_kept(cal: Calibrator, order: list[int], base_ppl: float, full_ratio: float) -> tuple[int, dict[int, float]]:
    """The smallest k such that keeping order[:k] in FP meets the bound, and every ratio measured
    on the way (k -> perplexity ratio to FP on the check windows)."""
    tried = {0: full_ratio}

    def ratio(k: int) -> float:
        if k not in tried:
            plan = cal.quant_plan(cal.units_to_quantize(set(order[:k])))
            tried[k] = cal.perplexity(plan, f"keep {k} layers") / base_ppl
        return tried[k]

    lo, hi = 0, len(order)          # ratio(lo) misses the bound; ratio(hi) = FP meets it
    tried[hi] = 1.0 if not cal.cfg.quantize_head else ratio(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ratio(mid) <= cal.cfg.bound:
            hi = mid
        else:
            lo = mid
    return hi, tried


def search_keep_fp(cal: Calibrator, base_ppl: float, full_ppl: float) -> tuple[list[int], dict]:
    """(layers to keep in FP, the search's record for calibration.json)."""
    t0 = time.perf_counter()
    windows = cal.check[: max(1, min(2, len(cal.check)))]
    fp_ppl, sens = layer_sensitivity(cal, windows)
    order = sorted(cal.source.layers, key=lambda l: -sens[l])
    n_kept, tried = fewest_kept(cal, order, base_ppl, full_ppl / base_ppl)
    keep = sorted(order[:n_kept])
    record = {"windows": int(len(windows)), "fp_ppl": fp_ppl,
              "ratio_only_this_layer_quantized": {str(k): round(v, 6) for k, v in sens.items()},
              "order": order, "ratio_by_layers_kept": {str(k): round(v, 6) for k, v in sorted(tried.items())},
              "kept": keep, "seconds": round(time.perf_counter() - t0, 1)}
    return keep, record
