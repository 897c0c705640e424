"""`ardeploy calibrate`: an FP bundle -> a new bundle whose graphs carry INT8 Q/DQ (or INT4 weight DQ).

    w8a16  INT8 weights (symmetric, per output channel), activations stay in the bundle's dtype
    w8a8   INT8 weights and INT8 activations (static per-tensor scales from calibration) for every
           linear layer of the decoder, with SmoothQuant folded into the preceding RMSNorm scale
           (q/k/v, gate/up), the v projection (o) or the up projection (down)
    w4a16  INT4 weights (symmetric, one scale per block of --block-size input channels) by round to
           nearest, AWQ (factors folded like SmoothQuant's, then clipping), GPTQ, or both (AWQ's
           factors, then GPTQ's rounding: the default, best measured); activations stay in the
           bundle's dtype (calibration/int4.py, awq.py)

Statistics come from the bundle's own score graph run in ONNX Runtime (the same graph code as
prefill/decode), so they belong to exactly the tensors that get quantized. Embeddings, norms,
softmax, attention and the LM head stay in the bundle's dtype unless `quantize_head` is set.

The stages, one module each: source.py (the FP bundle), data.py (windows), collect.py
(statistics), smoothing.py (SmoothQuant), act_scales.py (activation scales), weights.py (INT8
weights, GPTQ), sensitivity.py (--keep-fp auto), write.py (the new bundle). This module holds the
configuration and runs the stages in order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime import atomic
from ..runtime.bundle import Bundle, BundleError
from ..runtime.log import log
from . import evaluate as ev
from .act_scales import activation_scales
from .awq import awq_smoothing
from .compute import ops_for
from .collect import collect_channel_max, collect_histograms, reuse_statistics
from .data import calibration_data
from .graphs import QuantPlan, quantize_graph
from .int4 import check_block
from .passes import Pass, perplexity_in_passes, plan_passes
from .schemes import Scheme, scheme_named
from .sensitivity import search_keep_fp
from .smoothing import Smoothing, choose_smoothing
from .source import SourceModel, check_source
from .stats import METHODS, AbsHistogram
from .weights import WeightQuantizer, quant_plan, smoothed_float_plan
from .write import write_calibrated_bundle
from ..runtime.errors import UserError

WEIGHT_METHODS = ("max", "mse", "gptq")
INT4_METHODS = ("rtn", "awq", "gptq", "awq-gptq")


@dataclass
class CalibConfig:
    scheme: str
    method: str = "mse"
    percentile: float = 99.99
    smoothquant_alpha: float | None = 0.7       # None: no SmoothQuant
    samples: int = 128
    seq_len: int = 512
    weight_method: str = "max"
    keep_fp: list[int] | str | None = "auto"    # list of layers, "auto" (w8a8, w4a16: search if the check misses), None
    quantize_head: bool = False
    block_size: int = 32                        # w4a16: input channels per scale
    int4_weights: str = "awq-gptq"              # w4a16: rtn | awq | gptq | awq-gptq (AWQ's factors, GPTQ's rounding)
    max_ppl_ratio: float | None = None          # default: the scheme's default_bound (schemes.py)
    check_windows: int = 4                      # held-out windows for the ppl check (0: no check)
    check_data: str | None = None
    reuse_stats: str | None = None              # calibration.json of an earlier run (same bundle, data, alpha)
    target: str | None = None                   # None | "trt-rtx"
    compute_capabilities: tuple[str, ...] = ("SM89",)
    threads: int | None = None
    layers_per_pass: int | None = None          # None: as many as fit passes.PASS_BYTES (passes.py)
    compute: str = "auto"                       # weight arithmetic: auto | numpy | torch | cuda (compute.py)
    device: str = "cpu"                         # where ONNX Runtime runs the score graph: cpu | cuda
    progress: bool = True
    force: bool = False

    def validate(self) -> None:
        scheme_named(self.scheme)
        if self.method not in METHODS:
            raise UserError(f"unknown --method {self.method!r} (choose {', '.join(METHODS)})")
        if self.weight_method not in WEIGHT_METHODS:
            raise UserError(f"unknown --weight-method {self.weight_method!r} (choose {', '.join(WEIGHT_METHODS)})")
        if self.int4_weights not in INT4_METHODS:
            raise UserError(f"unknown --weights {self.int4_weights!r} (choose {', '.join(INT4_METHODS)})")
        if self.needs_hessians and self.reuse_stats:
            raise UserError(f"{'--weights ' + self.int4_weights if self.kind.blocked else '--weight-method gptq'} "
                            f"needs the data's Hessians, which calibration.json does not keep: drop --reuse-stats")
        if not self.kind.quantizes_activations and self.reuse_stats:
            raise UserError("--reuse-stats re-uses w8a8 activation statistics; w4a16 has none to re-use")
        if not 0 < self.percentile <= 100:
            raise UserError(f"--percentile must be in (0, 100] (got {self.percentile})")
        if self.smoothquant_alpha is not None and not 0 <= self.smoothquant_alpha <= 1:
            raise UserError(f"--smoothquant-alpha must be in [0, 1] (got {self.smoothquant_alpha})")
        if self.samples < 1 or self.seq_len < 2:
            raise UserError("--samples must be >= 1 and --seq-len >= 2")
        if self.layers_per_pass is not None and self.layers_per_pass < 1:
            raise UserError(f"--layers-per-pass must be at least 1 (got {self.layers_per_pass})")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"unknown --device {self.device!r} (cpu or cuda)")
        if self.target not in (None, "trt-rtx"):
            raise UserError(f"unknown --target {self.target!r} (trt-rtx)")

    @property
    def kind(self) -> Scheme:
        """The scheme as an object (calibration/schemes.py)."""
        return scheme_named(self.scheme)

    @property
    def bound(self) -> float:
        return self.max_ppl_ratio if self.max_ppl_ratio is not None else self.kind.default_bound

    @property
    def needs_hessians(self) -> bool:
        """X^T X of every quantized linear's input: GPTQ (INT8 or INT4) and AWQ."""
        if self.kind.blocked:
            return self.int4_weights != "rtn"
        return self.weight_method == "gptq"

    @property
    def weights_method(self) -> str:
        """How the weights are rounded: --weight-method (INT8) or --weights (INT4)."""
        return self.int4_weights if self.kind.blocked else self.weight_method



@dataclass
class CalibrationRecord:
    """Everything measured and decided; saved as calibration.json."""
    groups: dict[str, dict] = field(default_factory=dict)     # group -> stats, smoothing, thresholds, scale
    data: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


class Calibrator:
    """One calibration of an FP bundle: `run(data)` loads the data, collects the statistics, decides
    SmoothQuant factors and activation scales, quantizes the weights and checks the perplexity
    (searching which layers to keep in FP when w8a8 misses the bound). The steps are public for
    the tests and the docs table script."""

    def __init__(self, bundle: Bundle, cfg: CalibConfig):
        cfg.validate()
        check_source(bundle)
        runs_score = cfg.kind.quantizes_activations or cfg.check_windows or cfg.needs_hessians
        if runs_score and "score" not in bundle.manifest["graphs"]:
            raise BundleError(f"{bundle.path}: bundle has no score graph, which calibration runs "
                              f"(re-export without --no-score)")
        self.bundle, self.cfg = bundle, cfg
        self.source = SourceModel(bundle, cfg.quantize_head)
        self.ops = ops_for(cfg.compute)
        if cfg.kind.blocked:
            for lin in self.source.quantized_linears():
                check_block(lin.shape[1 - lin.out_axis], cfg.block_size, lin.param)
        self.record = CalibrationRecord()
        # load_data sets both: the calibration windows and those of the perplexity check
        self.windows = self.check = np.zeros((0, cfg.seq_len), np.int64)
        self.smoothing = Smoothing()
        self.act_scales: dict[str, float] = {}
        self.hessians: dict[str, np.ndarray] = {}      # group -> X^T X (GPTQ)
        self._quantizer: WeightQuantizer | None = None

    # -- data -------------------------------------------------------------------------------------
    def load_data(self, data) -> None:
        """`data`: a text/JSONL file, or an int array of token ids."""
        cfg = self.cfg
        d = calibration_data(self.bundle, data, cfg.seq_len, cfg.samples, cfg.check_windows, cfg.check_data)
        self.windows, self.check, self.record.data = d.windows, d.check, d.record
        if len(self.windows) < cfg.samples and cfg.progress:
            log.info(f"note: {data} has {d.available} windows of {cfg.seq_len} tokens; "
                     f"calibrating on {len(self.windows)} instead of --samples {cfg.samples}")

    # -- statistics and what they decide ------------------------------------------------------------
    def collect_channel_max(self) -> dict[str, np.ndarray]:
        """Per-channel max |x| of every calibrated activation (and, for GPTQ, X^T X into self.hessians)."""
        chmax, self.hessians = collect_channel_max(self.source, self.windows, self.cfg.needs_hessians,
                                                   self.cfg.threads, self.cfg.progress, device=self.cfg.device)
        return chmax

    def collect_histograms(self) -> dict[str, AbsHistogram]:
        return collect_histograms(self.source, self.windows, self.smoothing.factors, self.cfg.threads,
                                  self.cfg.progress, self.cfg.device)

    def reuse_statistics(self, path: str) -> tuple[dict, dict | None]:
        chmax, hists, self.record.data = reuse_statistics(path, self.source.groups(), self.cfg.smoothquant_alpha,
                                                          self.cfg.method)
        return chmax, hists

    def choose_smoothing(self, chmax: dict[str, np.ndarray]) -> None:
        self.smoothing = choose_smoothing(self.source, chmax, self.cfg.smoothquant_alpha, self.record.groups)

    def set_activation_scales(self, chmax: dict[str, np.ndarray], hists: dict[str, AbsHistogram] | None) -> None:
        self.act_scales = activation_scales(self.source.groups(), chmax, hists, self.smoothing.factors,
                                            self.cfg.method, self.cfg.percentile, self.source.float_np,
                                            self.record.groups)

    # -- quantized weights ------------------------------------------------------------------------
    @property
    def quantizer(self) -> WeightQuantizer:
        """The weight quantizer for the current smoothing, weight method and Hessians (its layers
        are kept while those stay the same)."""
        q, cfg = self._quantizer, self.cfg
        if q is None or q.smoothing is not self.smoothing or q.method != cfg.weights_method \
                or q.hessians is not self.hessians:
            bits = cfg.kind.weight_bits
            self._quantizer = WeightQuantizer(self.source, self.smoothing, cfg.weights_method, self.hessians,
                                              bits, cfg.block_size, self.ops)
        return self._quantizer

    def quant_plan(self, units) -> QuantPlan:
        """Quantize `units` (decoder layers; None: the head), leave the rest in FP."""
        act_scales = self.act_scales if self.cfg.kind.quantizes_activations else None
        return quant_plan(self.quantizer, units, act_scales, self.cfg.progress)

    def units_to_quantize(self, keep: set[int]) -> list:
        units = [l for l in self.source.layers if l not in keep]
        return units + ([None] if self.cfg.quantize_head else [])

    def smoothed_float_plan(self, layers) -> QuantPlan:
        return smoothed_float_plan(self.source, self.smoothing, layers)

    # -- evaluation -------------------------------------------------------------------------------
    def perplexity(self, plan: QuantPlan | None, desc: str, windows: np.ndarray | None = None) -> float:
        """Perplexity of the score graph (plan None: the FP one) on `windows` (default: the check windows)."""
        windows = self.check if windows is None else windows
        score, folder, threads = self.source.graphs["score"], self.bundle.path, self.cfg.threads
        passes = self.passes()
        if len(passes) > 1:
            return perplexity_in_passes(self.source, plan, windows, passes, threads, self.cfg.progress, desc,
                                        self.cfg.device)
        if plan is None:
            sess = ev.session(score, folder, threads=threads, device=self.cfg.device)
        else:
            model = quantize_graph(score, "score", self.source.linears, plan, ev.in_memory_initializer)
            sess = ev.session(model, folder, arrays=plan.tensors, threads=threads, device=self.cfg.device)
        seq_len = self.cfg.seq_len
        return ev.perplexity(ev.score_fn(sess), windows.reshape(-1), seq_len, seq_len, self.cfg.progress, desc)["ppl"]

    # -- the whole job ----------------------------------------------------------------------------
    def run(self, data) -> tuple[QuantPlan, list[int]]:
        """(the plan to write, layers kept in FP)."""
        t0 = time.perf_counter()
        self.load_data(data)
        keep = self._requested_keep_fp()
        units = self.units_to_quantize(set(keep))
        self._statistics(t0, units)
        t1 = time.perf_counter()
        plan = self.quant_plan(units)
        self.record.seconds["quantize_weights"] = round(time.perf_counter() - t1 +
                                                        self.record.seconds.pop("quantize_in_passes", 0.0), 1)
        if len(self.check):
            plan, keep = self._check(plan, keep)
        self.record.seconds["total_before_write"] = round(time.perf_counter() - t0, 1)
        return plan, keep

    def passes(self, hessians: bool = False) -> list[Pass]:
        """How the score graph is run over the windows: a few layers at a time for big models (passes.py)."""
        return plan_passes(self.source, hessians, self.cfg.layers_per_pass)

    def _statistics(self, t0: float, units: list) -> None:
        cfg = self.cfg
        if not cfg.kind.quantizes_activations and cfg.needs_hessians:
            self._weight_statistics(t0, units)
        elif cfg.kind.quantizes_activations:
            self.set_activation_scales(*self._w8a8_statistics(t0))

    def _weight_statistics(self, t0: float, units: list) -> None:
        """X^T X for AWQ / GPTQ, collected a pass of layers at a time (passes.py): as soon as a pass is in,
        its layers' AWQ factors are chosen, its units quantized (the quantizer keeps them) and its X^T X
        dropped, so the statistics of one pass are held at a time. Each layer's result depends only on
        its own statistics, so this is what collecting everything first gives."""
        cfg, record, seconds = self.cfg, self.record, {"awq_scales": 0.0, "quantize_in_passes": 0.0}
        awq = cfg.kind.blocked and cfg.int4_weights in ("awq", "awq-gptq")
        self.smoothing = Smoothing()
        groups = self.source.groups()

        def after_pass(p: Pass, chmax: dict, xtx: dict) -> None:
            mine = [g for g in chmax if p.holds(groups[g][0].layer)]
            for g in mine:
                record.groups.setdefault(g, {})["channel_absmax"] = np.round(chmax[g], 6).tolist()
            self.hessians, t1 = xtx, time.perf_counter()
            if awq:
                awq_smoothing(self.source, xtx, cfg.block_size, record.groups, cfg.progress,
                              layers=[l for l in self.source.layers if p.holds(l)], into=self.smoothing, ops=self.ops)
            t2 = time.perf_counter()
            for unit in units:
                if p.holds(unit):
                    self.quantizer.layer(unit)
            seconds["awq_scales"] += t2 - t1
            seconds["quantize_in_passes"] += time.perf_counter() - t2
            for g in mine:
                xtx.pop(g, None)

        passes = self.passes(hessians=True)
        collect_channel_max(self.source, self.windows, True, cfg.threads, cfg.progress, passes, after_pass, cfg.device)
        record.seconds["hessians"] = round(time.perf_counter() - t0 - sum(seconds.values()), 1)
        if awq:
            record.seconds["awq_scales"] = round(seconds["awq_scales"], 1)
        record.seconds["quantize_in_passes"] = seconds["quantize_in_passes"]
        if len(passes) > 1:
            record.data["passes"] = [[p.first, p.last] for p in passes]

    def _w8a8_statistics(self, t0: float) -> tuple[dict, dict | None]:
        """(per-channel maxima, histograms or None), SmoothQuant chosen from the maxima."""
        cfg = self.cfg
        if cfg.reuse_stats:
            chmax, hists = self.reuse_statistics(cfg.reuse_stats)
            self.choose_smoothing(chmax)
            return chmax, hists
        chmax = self.collect_channel_max()
        self.record.seconds["channel_max"] = round(time.perf_counter() - t0, 1)
        self.choose_smoothing(chmax)
        if cfg.method == "max":
            return chmax, None
        t1 = time.perf_counter()
        hists = self.collect_histograms()
        self.record.seconds["histograms"] = round(time.perf_counter() - t1, 1)
        return chmax, hists

    def _requested_keep_fp(self) -> list[int]:
        keep = [] if self.cfg.keep_fp in (None, "auto") else sorted(set(self.cfg.keep_fp))
        bad = [k for k in keep if k not in self.source.layers]
        if bad:
            raise UserError(f"--keep-fp {bad[0]}: the model has layers 0..{self.source.layers[-1]}")
        return keep

    def _check(self, plan: QuantPlan, keep: list[int]) -> tuple[QuantPlan, list[int]]:
        """Perplexity ratio on the check windows; w8a8 with --keep-fp auto that misses the bound
        searches for the layers to keep in FP."""
        cfg, t1 = self.cfg, time.perf_counter()
        base = self.perplexity(None, "check: fp")
        full = self.perplexity(plan, f"check: {cfg.scheme}")
        self.record.check = {"windows": int(len(self.check)), "fp_ppl": base, "quantized_ppl": full,
                             "ratio": full / base, "bound": cfg.bound, "kept_fp_layers": keep}
        if len(self.passes()) > 1:
            self.record.check["passes"] = [[p.first, p.last] for p in self.passes()]
        if cfg.kind.searches_keep_fp and cfg.keep_fp == "auto" and full / base > cfg.bound:
            if cfg.progress:
                log.info(f"{cfg.scheme} perplexity ratio {full / base:.4f} > {cfg.bound} on the check windows: "
                         f"measuring per-layer sensitivity")
            keep, self.record.sensitivity = search_keep_fp(self, base, full)
            plan = self.quant_plan(self.units_to_quantize(set(keep)))
            ratio = self.record.sensitivity["ratio_by_layers_kept"][str(len(keep))]
            self.record.check.update({"kept_fp_layers": keep, "ratio": ratio, "quantized_ppl": ratio * base})
        self.record.seconds["check"] = round(time.perf_counter() - t1, 1)
        return plan, keep


def calibrate_bundle(bundle_path, data, out, cfg: CalibConfig) -> dict:
    """Calibrate and write the quantized bundle (whole, or not at all); returns its manifest."""
    t0 = time.perf_counter()
    out = Path(out)
    bundle = Bundle.load(bundle_path)
    replace = _check_request(bundle, out, cfg)
    cal = Calibrator(bundle, cfg)
    plan, keep = cal.run(data)
    with atomic.folder_written_whole(out.resolve(), UserError, replace=replace) as folder:
        manifest = write_calibrated_bundle(folder, cal, plan, keep, t0)
    return manifest


def _check_request(bundle: Bundle, out: Path, cfg: CalibConfig) -> bool:
    """Refuse, before any work, what cannot be written or built; True: `out` will be replaced (--force)."""
    check_source(bundle)
    replace = atomic.check_out(out, cfg.force, UserError)
    if out.resolve() == Path(bundle.path).resolve():
        raise UserError(f"{out}: the output must be a new folder, not the source bundle")
    if cfg.target == "trt-rtx":
        from .trt_check import check_scheme_supported
        check_scheme_supported(cfg.scheme, bundle.manifest.get("dtype"), cfg.compute_capabilities)
    return replace
