"""`ardeploy calibrate`: an FP bundle -> a new bundle whose graphs carry INT8 Q/DQ.

    w8a16  INT8 weights (symmetric, per output channel), activations stay in the bundle's dtype
    w8a8   INT8 weights and INT8 activations (static per-tensor scales from calibration) for every
           linear layer of the decoder, with SmoothQuant folded into the preceding RMSNorm scale
           (q/k/v, gate/up), the v projection (o) or the up projection (down)

Statistics come from the bundle's own score graph run in ONNX Runtime (the same graph code as
prefill/decode), so they belong to exactly the tensors that get quantized. Embeddings, norms,
softmax, attention and the LM head stay in the bundle's dtype unless `quantize_head` is set.

The output is written into a temporary folder beside the target and renamed at the end; its
`weights.bin` holds every tensor once (INT8 weights, scales, untouched FP tensors), shared by all
graphs, like an exported bundle.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ..runtime import atomic
from ..runtime.bundle import Bundle, BundleError, numpy_dtype
from . import evaluate as ev
from .data import file_sha256, load_stream, make_windows
from .graphs import (NP_OF_ONNX, Linear, QuantPlan, activation_dtype, bias_of, find_linears, group_inputs,
                     initializer_map, linear_output, norm_weight_before, product_with, quantize_graph, stats_model)
from .stats import (METHODS, QMAX, AbsHistogram, gptq_factor, gptq_quantize, quantize_weight, smooth_factors,
                    threshold)

SCHEMES = ("w8a16", "w8a8")
WEIGHT_METHODS = ("max", "mse", "gptq")
CALIBRATION_FORMAT = 1
DEFAULT_BOUND = {"w8a16": 1.01, "w8a8": 1.05}
SMALL = 1 << 16


@dataclass
class CalibConfig:
    scheme: str
    method: str = "mse"
    percentile: float = 99.99
    smoothquant_alpha: float | None = 0.7       # None: no SmoothQuant
    samples: int = 128
    seq_len: int = 512
    weight_method: str = "max"
    keep_fp: list[int] | str | None = "auto"    # list of layers, "auto" (w8a8: search if the check misses), None
    quantize_head: bool = False
    max_ppl_ratio: float | None = None          # default: DEFAULT_BOUND[scheme]
    check_windows: int = 4                      # held-out windows for the ppl check (0: no check)
    check_data: str | None = None
    reuse_stats: str | None = None              # calibration.json of an earlier run (same bundle, data, alpha)
    target: str | None = None                   # None | "trt-rtx"
    compute_capabilities: tuple[str, ...] = ("SM89",)
    threads: int | None = None
    progress: bool = True
    force: bool = False

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown --scheme {self.scheme!r} (choose {' or '.join(SCHEMES)})")
        if self.method not in METHODS:
            raise ValueError(f"unknown --method {self.method!r} (choose {', '.join(METHODS)})")
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"unknown --weight-method {self.weight_method!r} (choose {', '.join(WEIGHT_METHODS)})")
        if self.weight_method == "gptq" and self.reuse_stats:
            raise ValueError("--weight-method gptq needs the data's Hessians, which calibration.json does not keep: "
                             "drop --reuse-stats")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"--percentile must be in (0, 100] (got {self.percentile})")
        if self.smoothquant_alpha is not None and not 0 <= self.smoothquant_alpha <= 1:
            raise ValueError(f"--smoothquant-alpha must be in [0, 1] (got {self.smoothquant_alpha})")
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError("--samples must be >= 1 and --seq-len >= 2")
        if self.target not in (None, "trt-rtx"):
            raise ValueError(f"unknown --target {self.target!r} (trt-rtx)")

    @property
    def bound(self) -> float:
        return self.max_ppl_ratio if self.max_ppl_ratio is not None else DEFAULT_BOUND[self.scheme]


def _log(msg: str, cfg: CalibConfig) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


# -- reading the source bundle --------------------------------------------------------------------
class SourceWeights:
    """Tensors of the source bundle's weights file, read through one memory map."""

    def __init__(self, bundle: Bundle):
        self.dir = Path(bundle.path)
        self.maps: dict[str, np.memmap] = {}

    def raw(self, t: TensorProto) -> memoryview:
        info = {e.key: e.value for e in t.external_data}
        loc = info["location"]
        if loc not in self.maps:
            self.maps[loc] = np.memmap(self.dir / loc, dtype=np.uint8, mode="r")
        off, n = int(info.get("offset", 0)), int(info["length"])
        return self.maps[loc][off: off + n]

    def array(self, t: TensorProto) -> np.ndarray:
        if t.data_location != TensorProto.EXTERNAL:
            return onnx.numpy_helper.to_array(t)
        dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        if t.data_type == TensorProto.BFLOAT16:
            dt = numpy_dtype("bfloat16")
        return np.frombuffer(self.raw(t), dtype=dt).reshape(tuple(t.dims))


def load_graphs(bundle: Bundle) -> dict[str, onnx.ModelProto]:
    return {kind: onnx.load(str(bundle.graph_path(kind)), load_external_data=False)
            for kind in bundle.manifest["graphs"]}


def check_source(bundle: Bundle) -> None:
    q = bundle.manifest.get("quantization")
    if q:
        raise BundleError(f"{bundle.path}: bundle is already quantized ({q.get('scheme', 'unknown scheme')}); "
                          f"calibrate the FP bundle it was made from")


# -- calibration state ----------------------------------------------------------------------------
@dataclass
class Calibration:
    """Everything measured and decided; saved as calibration.json."""
    groups: dict[str, dict] = field(default_factory=dict)     # group -> stats, smoothing, thresholds, scale
    data: dict = field(default_factory=dict)
    check: dict = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)


class Calibrator:
    def __init__(self, bundle: Bundle, cfg: CalibConfig):
        cfg.validate()
        check_source(bundle)
        self.bundle, self.cfg = bundle, cfg
        self.graphs = load_graphs(bundle)
        if "score" not in self.graphs and (cfg.scheme == "w8a8" or cfg.check_windows or cfg.weight_method == "gptq"):
            raise BundleError(f"{bundle.path}: bundle has no score graph, which calibration runs "
                              f"(re-export without --no-score)")
        self.linears = find_linears(self.graphs)
        if not any(l.layer is not None for l in self.linears.values()):
            raise BundleError(f"{bundle.path}: no linear layers found in the graphs")
        any_graph = next(iter(self.graphs.values()))
        self.float_dtype = activation_dtype(any_graph, self.linears)
        if self.float_dtype not in NP_OF_ONNX:
            raise ValueError(f"{bundle.path}: {bundle.manifest.get('dtype')} bundles are not supported by "
                             f"calibrate (fp32 or fp16; TensorRT has no bf16 Q/DQ scales on RTX GPUs before SM89)")
        self.act_np = NP_OF_ONNX[self.float_dtype]
        self.inits = {k: initializer_map(m) for k, m in self.graphs.items()}
        self.source = SourceWeights(bundle)
        self.layers = sorted({l.layer for l in self.linears.values() if l.layer is not None})
        self.cal = Calibration()
        self.smooth: dict[str, np.ndarray] = {}        # group -> s over the group's input channels
        self.fold: dict[str, tuple] = {}               # group -> how 1/s is folded
        self.act_scales: dict[str, float] = {}
        self._layer_cache: dict[int, tuple[dict, dict, dict]] = {}
        self.hessians: dict[str, np.ndarray] = {}      # group -> X^T X (GPTQ)

    # -- helpers ----------------------------------------------------------------------------------
    def weight(self, name: str) -> np.ndarray:
        for inits in self.inits.values():
            if name in inits:
                return self.source.array(inits[name])
        raise KeyError(name)

    def quantized_linears(self) -> list[Linear]:
        return [l for l in self.linears.values() if l.layer is not None or self.cfg.quantize_head]

    def groups(self) -> dict[str, list[Linear]]:
        out: dict[str, list[Linear]] = {}
        for l in self.quantized_linears():
            out.setdefault(l.group, []).append(l)
        return out

    # -- data -------------------------------------------------------------------------------------
    def load_data(self, path) -> None:
        """`path`: a text/JSONL file, or an int array of token ids (the Python API's way to calibrate
        a bundle without a tokenizer)."""
        cfg = self.cfg
        if isinstance(path, np.ndarray):
            stream, docs = np.asarray(path, np.int64).reshape(-1), 1
            if len(stream) and not (0 <= stream.min() and stream.max() < self.bundle.vocab_size):
                raise ValueError(f"token ids must be in [0, {self.bundle.vocab_size})")
        else:
            stream, docs = load_stream(self.bundle, path)
        w = make_windows(stream, cfg.seq_len, cfg.samples, source="token ids" if isinstance(path, np.ndarray) else str(path),
                         documents=docs)
        self.windows = w.calib
        heldout = w.heldout
        if cfg.check_data:
            cstream, _ = load_stream(self.bundle, cfg.check_data)
            n = len(cstream) // cfg.seq_len
            if n == 0:
                raise ValueError(f"{cfg.check_data}: shorter than one window of --seq-len {cfg.seq_len}")
            heldout = cstream[: n * cfg.seq_len].reshape(n, cfg.seq_len)
        if cfg.check_windows and len(heldout):
            idx = np.unique(np.linspace(0, len(heldout) - 1, min(cfg.check_windows, len(heldout))).round().astype(int))
            self.check = heldout[idx]
        else:
            self.check = np.zeros((0, cfg.seq_len), np.int64)
        is_file = not isinstance(path, np.ndarray)
        self.cal.data = {"file": str(Path(path).resolve()) if is_file else None,
                         "sha256": file_sha256(path) if is_file else None, "documents": docs,
                         "tokens": int(w.total_tokens), "seq_len": cfg.seq_len, "samples_requested": cfg.samples,
                         "samples": int(len(self.windows)), "check_windows": int(len(self.check)),
                         "check_source": cfg.check_data or "held-out windows of the calibration file"}
        if len(self.windows) < cfg.samples:
            _log(f"note: {path} has {len(w.calib) + len(w.heldout)} windows of {cfg.seq_len} tokens; "
                 f"calibrating on {len(self.windows)} instead of --samples {cfg.samples}", cfg)

    # -- statistics -------------------------------------------------------------------------------
    def _stats_session(self, reduce: bool, hessian: bool = False):
        score = self.graphs["score"]
        tensors = group_inputs({l.param: l for l in self.quantized_linears()}, "score")
        model = stats_model(score, tensors, reduce, self.float_dtype, hessian)
        sess = ev.session(model, self.bundle.path, threads=self.cfg.threads)
        outs = [o.name for o in model.graph.output]
        return sess, list(tensors), outs

    def _run(self, sess, outs, ids):
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        return sess.run(outs, {"input_ids": ids, "attention_mask": np.ones_like(ids)})

    def collect_channel_max(self) -> dict[str, np.ndarray]:
        """Per-channel max |x| of every calibrated activation (and, for GPTQ, X^T X)."""
        from tqdm import tqdm
        hessian = self.cfg.weight_method == "gptq"
        sess, keys, outs = self._stats_session(reduce=True, hessian=hessian)
        chmax: dict[str, np.ndarray] = {}
        desc = "calibrate: channel max" + (" + Hessians" if hessian else "")
        for ids in tqdm(self.windows, desc=desc, unit="window", disable=not self.cfg.progress, leave=False):
            values = self._run(sess, outs, ids)
            for j, k in enumerate(keys):
                v = np.asarray(values[j * (2 if hessian else 1)], np.float32).reshape(-1)
                chmax[k] = v if k not in chmax else np.maximum(chmax[k], v)
                if hessian:
                    h = np.asarray(values[2 * j + 1], np.float32).reshape(len(v), len(v))
                    if k in self.hessians:
                        self.hessians[k] += h
                    else:
                        self.hessians[k] = h.copy()
        return chmax

    def collect_histograms(self) -> dict[str, AbsHistogram]:
        from tqdm import tqdm
        sess, keys, outs = self._stats_session(reduce=False)
        hists = {k: AbsHistogram() for k in keys}
        inv = {k: (1.0 / self.smooth[k]).astype(np.float32) if k in self.smooth else None for k in keys}
        for ids in tqdm(self.windows, desc="calibrate: histograms", unit="window", disable=not self.cfg.progress,
                        leave=False):
            for k, v in zip(keys, self._run(sess, outs, ids)):
                a = np.abs(np.asarray(v, np.float32))
                if inv[k] is not None:
                    a *= inv[k]
                hists[k].add(a)
        return hists

    # -- SmoothQuant --------------------------------------------------------------------------------
    def plan_smoothing(self, chmax: dict[str, np.ndarray]) -> None:
        """Factors s per group and where 1/s is folded; groups whose producer we cannot fold into
        exactly (in every graph) are left unsmoothed."""
        alpha = self.cfg.smoothquant_alpha
        if alpha is None:
            return
        spec = self.bundle.spec
        for group, lins in self.groups().items():
            if group == "head":
                continue
            layer = lins[0].layer
            modules = {l.module: l for l in self.linears.values() if l.layer == layer}
            kind = group.rsplit(".", 1)[1]
            x = chmax[group]
            wmax = np.max([np.abs(self.weight(l.param).astype(np.float32)).max(axis=l.out_axis) for l in lins], axis=0)
            reason = None
            if kind in ("qkv", "gate_up"):
                gammas = {k: norm_weight_before(m, group_inputs(self.linears, k)[group]) for k, m in self.graphs.items()}
                names = set(gammas.values())
                if None in names or len(names) != 1:
                    reason = "input is not an RMSNorm scale in every graph"
                else:
                    fold = ("gamma", names.pop())
                    s = smooth_factors(x, wmax, alpha)
            elif kind == "down" and "mlp.up_proj" in modules:
                up = modules["mlp.up_proj"]
                ok = True
                for k, m in self.graphs.items():
                    outs = {linear_output(m, u.node, bias_of(up.param, self.inits[k])) for u in up.uses[k]}
                    ok &= product_with(m, group_inputs(self.linears, k)[group], outs)
                if not ok:
                    reason = "input is not a product with the up projection in every graph"
                else:
                    fold = ("columns", up.param)
                    s = smooth_factors(x, wmax, alpha)
            elif kind == "o" and "self_attn.v_proj" in modules:
                v = modules["self_attn.v_proj"]
                nh, nkv, hd = spec["n_heads"], spec["n_kv_heads"], spec["head_dim"]
                if len(x) != nh * hd or v.shape[v.out_axis] != nkv * hd:
                    reason = "o/v projection sizes do not match the head layout"
                else:
                    # one factor per (kv head, dim): the query heads of a group share their V
                    rep = nh // nkv
                    xg = x.reshape(nkv, rep, hd).max(1)
                    wg = wmax.reshape(nkv, rep, hd).max(1)
                    sg = smooth_factors(xg.reshape(-1), wg.reshape(-1), alpha).reshape(nkv, 1, hd)
                    s = np.broadcast_to(sg, (nkv, rep, hd)).reshape(-1).copy()
                    fold = ("v_columns", v.param, sg.reshape(-1))
            else:
                reason = "no producer to fold the factors into"
            entry = self.cal.groups.setdefault(group, {})
            if reason:
                entry["smoothquant"] = {"applied": False, "reason": reason}
                continue
            self.smooth[group] = s
            self.fold[group] = fold
            entry["smoothquant"] = {"applied": True, "alpha": alpha, "fold_into": fold[1],
                                    "factors": np.round(s, 6).tolist()}

    # -- scales -----------------------------------------------------------------------------------
    def compute_act_scales(self, chmax: dict[str, np.ndarray], hists: dict[str, AbsHistogram] | None) -> None:
        cfg = self.cfg
        for group in self.groups():
            entry = self.cal.groups.setdefault(group, {})
            cm = chmax[group] / self.smooth[group] if group in self.smooth else chmax[group]
            entry["channel_absmax"] = np.round(chmax[group], 6).tolist()
            thresholds = {"max": float(cm.max())}
            if hists is not None:
                h = hists[group]
                entry["histogram"] = h.to_json()
                # every method's threshold, for comparison in calibration.json; entropy (the slow one,
                # and the worst on LLM activations) only when chosen
                thresholds.update({m: threshold(h, m, cfg.percentile) for m in METHODS
                                   if m != "max" and (m != "entropy" or cfg.method == "entropy")})
            entry["thresholds"] = thresholds
            t = thresholds[cfg.method]
            if not t > 0 or not math.isfinite(t):
                t = max(thresholds["max"], 1e-6)
            scale = float(self.act_np(t / QMAX))
            if scale == 0.0 or not math.isfinite(scale):
                raise ValueError(f"{group}: activation scale {t / QMAX} does not fit {self.act_np.__name__}")
            entry["threshold"], entry["scale"] = t, scale
            self.act_scales[group] = scale

    def load_stats(self, path: str) -> tuple[dict, dict | None]:
        try:
            old = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read calibration statistics ({e})") from None
        alpha = old.get("config", {}).get("smoothquant_alpha")
        if old.get("scheme") != "w8a8" or alpha != self.cfg.smoothquant_alpha:
            raise ValueError(f"{path}: statistics are for scheme {old.get('scheme')} with SmoothQuant alpha {alpha}; "
                             f"re-use needs w8a8 and the same --smoothquant-alpha")
        groups = old["groups"]
        missing = [g for g in self.groups() if g not in groups]
        if missing:
            raise ValueError(f"{path}: no statistics for {missing[0]} (calibrated on another bundle?)")
        chmax = {g: np.asarray(groups[g]["channel_absmax"], np.float32) for g in self.groups()}
        hists = None
        if all("histogram" in groups[g] for g in self.groups()):
            hists = {g: AbsHistogram.from_json(groups[g]["histogram"]) for g in self.groups()}
        elif self.cfg.method != "max":
            raise ValueError(f"{path}: has no histograms (it was made with --method max); use --method max")
        self.cal.data = dict(old.get("data", {}), reused_from=str(Path(path).resolve()))
        return chmax, hists

    # -- quantized tensors ------------------------------------------------------------------------
    def smoothed_layer(self, layer: int | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(float32 linear weights after SmoothQuant, other tensors it changes: RMSNorm scales,
        biases of v/up projections, in their stored dtype) of one layer (None: the head).
        Without SmoothQuant (w8a16, or no factors) the weights are the stored ones."""
        lins = [l for l in self.quantized_linears() if l.layer == layer]
        rows: dict[str, np.ndarray] = {}       # param -> factor per input channel
        cols: dict[str, np.ndarray] = {}       # param -> factor per output channel
        others: dict[str, np.ndarray] = {}
        if self.cfg.scheme == "w8a8":
            for l in lins:
                if l.group not in self.smooth:
                    continue
                rows[l.param] = self.smooth[l.group]
                fold = self.fold[l.group]
                if fold[0] == "gamma":
                    g = self.weight(fold[1])
                    others[fold[1]] = (g.astype(np.float32) / self.smooth[l.group]).astype(g.dtype)
                elif fold[0] == "columns":
                    cols[fold[1]] = 1.0 / self.smooth[l.group]
                elif fold[0] == "v_columns":
                    cols[fold[1]] = 1.0 / fold[2]
        weights = {}
        for l in lins:
            wf = self.weight(l.param).astype(np.float32)
            if l.param in rows:
                wf = wf * np.expand_dims(rows[l.param], l.out_axis)
            if l.param in cols:
                wf = wf * np.expand_dims(cols[l.param], 1 - l.out_axis)
                b = bias_of(l.param, next(iter(self.inits.values())))
                if b:
                    bv = self.weight(b)
                    others[b] = (bv.astype(np.float32) * cols[l.param]).astype(bv.dtype)
            weights[l.param] = wf
        return weights, others

    def layer_tensors(self, layer: int | None) -> tuple[dict, dict, set]:
        """(tensors, weight scale names, activation groups) of one layer (None: the head), smoothed
        and quantized; cached (activation scales are looked up by plan(), so they can change)."""
        if layer in self._layer_cache:
            return self._layer_cache[layer]
        weights, tensors = self.smoothed_layer(layer)
        scales, groups = {}, set()
        quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self.cfg.weight_method == "gptq":
            # GPTQ treats output channels independently given the input Hessian, so the linears
            # reading one input (q/k/v, gate/up) are quantized together, as one wider matrix
            by_group: dict[str, list[str]] = {}
            for param in weights:
                by_group.setdefault(self.linears[param].group, []).append(param)
            for group, params in by_group.items():
                h = self.hessians[group]
                if group in self.smooth and self.cfg.scheme == "w8a8":      # the Hessian of X / s
                    inv = 1.0 / self.smooth[group]
                    h = h * np.outer(inv, inv)
                factor = gptq_factor(h)
                cols = [weights[p] if self.linears[p].out_axis == 1 else weights[p].T for p in params]
                q, s = gptq_quantize(np.concatenate(cols, axis=1), 1, factor, self.act_np)
                start = 0
                for p, c in zip(params, cols):
                    qp, sp = q[:, start: start + c.shape[1]], s[start: start + c.shape[1]]
                    start += c.shape[1]
                    quantized[p] = (np.ascontiguousarray(qp if self.linears[p].out_axis == 1 else qp.T), sp.copy())
        else:
            for param, wf in weights.items():
                quantized[param] = quantize_weight(wf, self.linears[param].out_axis, self.act_np,
                                                   self.cfg.weight_method)
        for param, (q, s) in quantized.items():
            tensors[QuantPlan.qweight_name(param)] = q
            tensors[QuantPlan.scale_name(param)] = s
            scales[param] = QuantPlan.scale_name(param)
            groups.add(self.linears[param].group)
        self._layer_cache[layer] = (tensors, scales, groups)
        return self._layer_cache[layer]

    def smoothed_float_plan(self, layers) -> QuantPlan:
        """SmoothQuant applied, nothing quantized: the graphs must compute what the FP bundle does
        (a test of the folding, which is exact up to float rounding)."""
        plan = QuantPlan(float_dtype=self.float_dtype)
        for layer in layers:
            weights, others = self.smoothed_layer(layer)
            plan.tensors.update(others)
            for p, wf in weights.items():
                plan.tensors[p] = wf.astype(self.weight(p).dtype)
        return plan

    def plan(self, layers) -> QuantPlan:
        """Quantize `layers` (None: the head), leave the rest in FP."""
        from tqdm import tqdm
        layers = list(layers)
        todo = sum(l not in self._layer_cache for l in layers)
        plan = QuantPlan(float_dtype=self.float_dtype)
        for layer in tqdm(layers, desc=f"quantize weights ({self.cfg.weight_method})", unit="layer", leave=False,
                          disable=not self.cfg.progress or todo < 2):
            t, s, groups = self.layer_tensors(layer)
            plan.tensors.update(t)
            plan.weight_scales.update(s)
            if self.cfg.scheme == "w8a8":
                plan.act_scales.update({g: self.act_scales[g] for g in groups})
        return plan

    def all_units(self, keep: set[int]) -> list:
        units = [l for l in self.layers if l not in keep]
        return units + ([None] if self.cfg.quantize_head else [])

    # -- evaluation -------------------------------------------------------------------------------
    def check_ppl(self, plan: QuantPlan | None, desc: str, windows: np.ndarray | None = None) -> float:
        windows = self.check if windows is None else windows
        score = self.graphs["score"]
        if plan is None:
            sess = ev.session(score, self.bundle.path, threads=self.cfg.threads)
        else:
            model = quantize_graph(score, "score", self.linears, plan, ev.in_memory_initializer)
            sess = ev.session(model, self.bundle.path, arrays=plan.tensors, threads=self.cfg.threads)
        stream = windows.reshape(-1)
        r = ev.perplexity(ev.score_fn(sess), stream, self.cfg.seq_len, self.cfg.seq_len, self.cfg.progress, desc)
        return r["ppl"]

    def search_keep_fp(self, base_ppl: float, full_ppl: float) -> list[int]:
        """Per-layer sensitivity (ppl with only that layer quantized), then the fewest most
        sensitive layers to keep in FP so the whole model meets the bound (binary search)."""
        from tqdm import tqdm
        cfg = self.cfg
        t0 = time.perf_counter()
        sens_windows = self.check[: max(1, min(2, len(self.check)))]
        base_small = self.check_ppl(None, "sensitivity: fp", sens_windows)
        sens = {}
        for layer in tqdm(self.layers, desc="sensitivity", unit="layer", disable=not cfg.progress, leave=False):
            sens[layer] = self.check_ppl(self.plan([layer]), f"layer {layer}", sens_windows) / base_small
        order = sorted(self.layers, key=lambda l: -sens[l])
        tried = {0: full_ppl / base_ppl}

        def ratio(k):
            if k not in tried:
                keep = set(order[:k])
                tried[k] = self.check_ppl(self.plan(self.all_units(keep)), f"keep {k} layers") / base_ppl
            return tried[k]

        lo, hi = 0, len(order)          # ratio(lo) misses the bound; ratio(hi) = FP meets it
        tried[hi] = 1.0 if not cfg.quantize_head else ratio(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ratio(mid) <= cfg.bound:
                hi = mid
            else:
                lo = mid
        keep = sorted(order[:hi])
        self.cal.sensitivity = {"windows": int(len(sens_windows)), "fp_ppl": base_small,
                                "ratio_only_this_layer_quantized": {str(k): round(v, 6) for k, v in sens.items()},
                                "order": order, "ratio_by_layers_kept": {str(k): round(v, 6) for k, v in sorted(tried.items())},
                                "kept": keep, "seconds": round(time.perf_counter() - t0, 1)}
        return keep

    # -- the whole job ----------------------------------------------------------------------------
    def run(self, data: str) -> tuple[QuantPlan, list[int]]:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.load_data(data)
        if cfg.scheme == "w8a16" and cfg.weight_method == "gptq":
            chmax = self.collect_channel_max()
            self.cal.seconds["hessians"] = round(time.perf_counter() - t0, 1)
            for g, v in chmax.items():
                self.cal.groups.setdefault(g, {})["channel_absmax"] = np.round(v, 6).tolist()
        if cfg.scheme == "w8a8":
            if cfg.reuse_stats:
                chmax, hists = self.load_stats(cfg.reuse_stats)
                self.plan_smoothing(chmax)
            else:
                chmax = self.collect_channel_max()
                self.cal.seconds["channel_max"] = round(time.perf_counter() - t0, 1)
                self.plan_smoothing(chmax)
                hists = None
                if cfg.method != "max":
                    t1 = time.perf_counter()
                    hists = self.collect_histograms()
                    self.cal.seconds["histograms"] = round(time.perf_counter() - t1, 1)
            self.compute_act_scales(chmax, hists)
        keep = [] if cfg.keep_fp in (None, "auto") else sorted(set(cfg.keep_fp))
        bad = [k for k in keep if k not in self.layers]
        if bad:
            raise ValueError(f"--keep-fp {bad[0]}: the model has layers 0..{self.layers[-1]}")
        t1 = time.perf_counter()
        plan = self.plan(self.all_units(set(keep)))
        self.cal.seconds["quantize_weights"] = round(time.perf_counter() - t1, 1)
        if len(self.check):
            t1 = time.perf_counter()
            base = self.check_ppl(None, "check: fp")
            full = self.check_ppl(plan, f"check: {cfg.scheme}")
            self.cal.check = {"windows": int(len(self.check)), "fp_ppl": base, "quantized_ppl": full,
                              "ratio": full / base, "bound": cfg.bound, "kept_fp_layers": keep}
            if cfg.scheme == "w8a8" and cfg.keep_fp == "auto" and full / base > cfg.bound:
                _log(f"w8a8 perplexity ratio {full / base:.4f} > {cfg.bound} on the check windows: "
                     f"measuring per-layer sensitivity", cfg)
                keep = self.search_keep_fp(base, full)
                plan = self.plan(self.all_units(set(keep)))
                ratio = self.cal.sensitivity["ratio_by_layers_kept"][str(len(keep))]
                self.cal.check.update({"kept_fp_layers": keep, "ratio": ratio, "quantized_ppl": ratio * base})
            self.cal.seconds["check"] = round(time.perf_counter() - t1, 1)
        self.cal.seconds["total_before_write"] = round(time.perf_counter() - t0, 1)
        return plan, keep


# -- writing the bundle ---------------------------------------------------------------------------
class WeightsWriter:
    """One weights file; tensors >= 64 KiB start on 64 KiB boundaries (as the exporter writes them)."""

    def __init__(self, path: Path):
        self.path, self.file, self.offset = path, open(path, "wb"), 0
        self.placed: dict[str, tuple[int, int]] = {}

    def put(self, name: str, data) -> tuple[int, int]:
        if name in self.placed:
            return self.placed[name]
        raw = memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1)) if isinstance(data, np.ndarray) else data
        n = len(raw)
        align = SMALL if n >= SMALL else 64
        pad = -self.offset % align
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        self.file.write(raw)
        self.placed[name] = (self.offset, n)
        self.offset += n
        return self.placed[name]

    def close(self):
        self.file.close()


def relocate(model: onnx.ModelProto, writer: WeightsWriter, arrays: dict[str, np.ndarray], source: SourceWeights) -> None:
    """Point every external initializer at the new weights file, writing its bytes there once."""
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        data = arrays[t.name] if info["location"] == ev.IN_MEMORY else source.raw(t)
        off, n = writer.put(t.name, data)
        del t.external_data[:]
        for k, v in (("location", writer.path.name), ("offset", str(off)), ("length", str(n))):
            t.external_data.add(key=k, value=v)


def smoke_run(out: Path, manifest: dict, threads: int | None) -> dict:
    """Each graph loads and runs in ONNX Runtime on a few tokens (prefill, then decode one more)."""
    ids = np.array([[1, 2, 3, 4]], np.int64) % manifest["spec"]["vocab_size"]
    results = {}
    for kind in manifest["graphs"]:
        sess = ev.session(out / manifest["graphs"][kind]["file"], threads=threads)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if kind == "decode":
            n_kv, hd = manifest["spec"]["n_kv_heads"], manifest["spec"]["head_dim"]
            past = np.zeros((4, 1, n_kv, hd), numpy_dtype(manifest["kv_dtype"]))
            feeds = {"input_ids": ids[:, :1], "attention_mask": np.ones((1, 5), np.int64)}
            feeds.update({i.name: past for i in sess.get_inputs() if i.name.startswith("past.")})
        logits = sess.run(["logits"], feeds)[0]
        if not np.isfinite(logits).all():
            raise RuntimeError(f"{kind}: quantized graph gives non-finite logits")
        results[kind] = logits
    return results


def calibrate_bundle(bundle_path, data: str, out, cfg: CalibConfig) -> dict:
    """Calibrate and write the quantized bundle; returns its manifest."""
    t0 = time.perf_counter()
    out = Path(out)
    bundle = Bundle.load(bundle_path)
    check_source(bundle)
    atomic.check_out(out, cfg.force)
    if out.resolve() == Path(bundle.path).resolve():
        raise ValueError(f"{out}: the output must be a new folder, not the source bundle")
    if cfg.target == "trt-rtx":
        from .trt_check import check_scheme_supported
        check_scheme_supported(cfg.scheme, bundle.manifest.get("dtype"), cfg.compute_capabilities)
    cal = Calibrator(bundle, cfg)
    plan, keep = cal.run(data)

    out = out.resolve()
    tmp = atomic.temp_beside(out)
    try:
        writer = WeightsWriter(tmp / "weights.bin")
        graphs_out = {}
        try:
            for kind, model in cal.graphs.items():
                q = quantize_graph(model, kind, cal.linears, plan, ev.in_memory_initializer)
                relocate(q, writer, plan.tensors, cal.source)
                path = tmp / bundle.manifest["graphs"][kind]["file"]
                onnx.save_model(q, str(path))
                graphs_out[kind] = q
        finally:
            writer.close()
        for kind in graphs_out:
            onnx.checker.check_model(str(tmp / bundle.manifest["graphs"][kind]["file"]))
        if bundle.manifest.get("tokenizer"):
            shutil.copy2(bundle.path / bundle.manifest["tokenizer"], tmp / bundle.manifest["tokenizer"])
        manifest = build_manifest(bundle, cfg, cal, plan, keep, writer, t0)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        smoke_run(tmp, manifest, cfg.threads)
        if cfg.target == "trt-rtx":
            from .trt_check import build_bundle_graphs
            manifest["quantization"]["tensorrt_rtx_build"] = build_bundle_graphs(
                tmp, manifest, cfg.compute_capabilities, kinds=("prefill", "decode"), progress=cfg.progress)
        manifest["quantization"]["calibration_seconds"] = round(time.perf_counter() - t0, 1)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        (tmp / "calibration.json").write_text(json.dumps(calibration_json(bundle, cfg, cal, keep, plan), indent=1),
                                              encoding="utf-8")
        atomic.move_into_place(tmp, out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_manifest(bundle: Bundle, cfg: CalibConfig, cal: Calibrator, plan: QuantPlan, keep: list[int],
                   writer: WeightsWriter, t0: float) -> dict:
    m = json.loads(json.dumps(bundle.manifest))
    m["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    m["weights"] = {"file": writer.path.name, "bytes": writer.offset, "tensors": len(writer.placed)}
    quantized_layers = [l for l in cal.layers if l not in keep]
    m["quantization"] = {
        "scheme": cfg.scheme,
        "format": "onnx-qdq",
        "weights": {"dtype": "int8", "symmetric": True, "granularity": "per-output-channel",
                    "method": cfg.weight_method, "scale_dtype": np.dtype(cal.act_np).name},
        "activations": None if cfg.scheme == "w8a16" else
        {"dtype": "int8", "symmetric": True, "granularity": "per-tensor", "static": True, "method": cfg.method,
         "percentile": cfg.percentile if cfg.method == "percentile" else None,
         "smoothquant_alpha": cfg.smoothquant_alpha},
        "quantized_layers": quantized_layers,
        "kept_fp_layers": keep,
        "lm_head": "int8" if cfg.quantize_head else m["dtype"],
        "embeddings": "int8" if (cfg.quantize_head and m["spec"].get("tie_word_embeddings")) else m["dtype"],
        "needs": {"int8_weight_only_gemm": True, "int8_gemm": cfg.scheme == "w8a8"},
        "calibration": "calibration.json",
        "check": cal.cal.check or None,
        "source_bundle": {"path": str(Path(bundle.path).resolve()), "created": bundle.manifest.get("created"),
                          "dtype": bundle.manifest.get("dtype"), "weights_bytes": bundle.manifest["weights"]["bytes"]},
    }
    return m


def weight_scale_summary(plan: QuantPlan) -> dict:
    """Per quantized weight: its per-output-channel scale range (the scales themselves are in weights.bin)."""
    out = {}
    for param, sname in sorted(plan.weight_scales.items()):
        s = np.asarray(plan.tensors[sname], np.float32)
        out[param] = {"scale": sname, "channels": int(s.size), "min": float(s.min()), "max": float(s.max())}
    return out


def calibration_json(bundle: Bundle, cfg: CalibConfig, cal: Calibrator, keep: list[int], plan: QuantPlan) -> dict:
    c = cal.cal
    return {
        "format": "ardeploy-calibration", "format_version": CALIBRATION_FORMAT,
        "scheme": cfg.scheme,
        "config": {"method": cfg.method, "percentile": cfg.percentile, "smoothquant_alpha": cfg.smoothquant_alpha,
                   "weight_method": cfg.weight_method, "samples": cfg.samples, "seq_len": cfg.seq_len,
                   "quantize_head": cfg.quantize_head, "keep_fp": keep, "keep_fp_requested": cfg.keep_fp},
        "source_bundle": str(Path(bundle.path).resolve()),
        "data": c.data,
        "groups": c.groups,
        "weights": weight_scale_summary(plan),
        "graph_tensors": {kind: group_inputs(cal.linears, kind) for kind in cal.graphs},
        "check": c.check,
        "sensitivity": c.sensitivity,
        "seconds": c.seconds,
    }
