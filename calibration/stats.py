"""Activation statistics and the four ways of turning them into an INT8 clipping threshold.

For each activation that feeds a quantized GEMM we keep: the per-channel absolute maximum (for
SmoothQuant), and a histogram of |x| with a fixed number of equal-width bins over [0, range).
When a batch exceeds the range, the range doubles and adjacent bin pairs merge, so counts stay
exact and the histogram never needs a second pass to find the range.

Methods (symmetric INT8, scale = threshold / 127):
  max         the largest |x| seen
  percentile  the |x| below which `percentile`% of the values lie
  entropy     TensorRT's classic calibration: the threshold whose 128-level quantized histogram
              is closest, in KL divergence, to the clipped reference histogram
  mse         the threshold minimizing the expected squared error (rounding inside, clipping outside)
"""
from __future__ import annotations

import contextlib
import ctypes
import math

import numpy as np

from ..runtime.errors import UserError

QMAX = 127
METHODS = ("max", "percentile", "entropy", "mse")
DEFAULT_BINS = 4096
ENTROPY_BINS = 2048


class AbsHistogram:
    def __init__(self, bins: int = DEFAULT_BINS):
        self.bins = bins
        self.counts = np.zeros(bins, np.int64)
        self.range = 0.0          # upper edge; 0 until the first non-zero value
        self.amax = 0.0
        self.total = 0

    def add(self, absx: np.ndarray) -> None:
        """absx: absolute values (any shape, float)."""
        flat = absx.reshape(-1)
        if flat.size == 0:
            return
        m = float(flat.max())
        if not math.isfinite(m):
            raise UserError("non-finite activation seen during calibration")
        self.total += flat.size
        self.amax = max(self.amax, m)
        if m == 0.0:
            self.counts[0] += flat.size
            return
        if self.range == 0.0:
            self.range = m * (1 + 1e-6)
        elif m >= self.range:
            factor = 1 << math.ceil(math.log2(m / self.range) + 1e-12)
            while self.range * factor <= m:
                factor <<= 1
            self._grow(factor)
        idx = np.minimum((flat * np.float32(self.bins / self.range)).astype(np.int64), self.bins - 1)
        self.counts += np.bincount(idx, minlength=self.bins)

    def _grow(self, factor: int) -> None:
        merged = np.zeros(self.bins, np.int64)
        groups = self.counts.reshape(-1, factor).sum(1) if self.bins % factor == 0 else None
        if groups is None:        # factor larger than the bin count: everything falls into bin 0
            merged[0] = self.counts.sum()
        else:
            merged[: len(groups)] = groups
        self.counts, self.range = merged, self.range * factor

    @property
    def width(self) -> float:
        return self.range / self.bins

    def to_json(self) -> dict:
        used = int(np.flatnonzero(self.counts)[-1]) + 1 if self.counts.any() else 0
        return {"bins": self.bins, "range": self.range, "amax": self.amax, "total": self.total,
                "counts": self.counts[:used].tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "AbsHistogram":
        h = cls(d["bins"])
        c = np.asarray(d["counts"], np.int64)
        h.counts[: len(c)] = c
        h.range, h.amax, h.total = float(d["range"]), float(d["amax"]), int(d["total"])
        return h


# -- thresholds -------------------------------------------------------------------------------
def _trimmed(h: AbsHistogram) -> tuple[np.ndarray, float]:
    """Counts up to the last non-empty bin, and the bin width."""
    nz = np.flatnonzero(h.counts)
    used = int(nz[-1]) + 1 if len(nz) else 1
    return h.counts[:used].astype(np.float64), h.width


def threshold_max(h: AbsHistogram) -> float:
    return h.amax


def threshold_percentile(h: AbsHistogram, percentile: float = 99.99) -> float:
    if not 0 < percentile <= 100:
        raise UserError(f"--percentile must be in (0, 100] (got {percentile})")
    counts, w = _trimmed(h)
    if percentile == 100 or counts.sum() == 0:
        return h.amax
    cdf = np.cumsum(counts) / counts.sum()
    target = percentile / 100.0
    i = int(np.searchsorted(cdf, target))
    below = cdf[i - 1] if i > 0 else 0.0
    frac = (target - below) / max(cdf[i] - below, 1e-300)        # linear inside the bin
    return float(min(h.amax, (i + frac) * w))


def threshold_entropy(h: AbsHistogram, levels: int = QMAX + 1, start: int | None = None) -> float:
    """TensorRT's classic KL-divergence calibration (8-bit: 128 levels of |x|) on the histogram.

    For each candidate bin count i >= `levels`: reference P = the first i bins with all mass
    beyond folded into bin i-1; candidate Q = the first i bins merged into `levels` equal groups,
    each group's mass spread evenly over its non-empty bins. The threshold is the upper edge of
    the i with the smallest KL(P || Q).
    """
    counts, w = _trimmed(h)
    if len(counts) > ENTROPY_BINS:      # the classic method works on 2048 bins: merge neighbours
        f = -(-len(counts) // ENTROPY_BINS)
        counts = np.pad(counts, (0, -len(counts) % f)).reshape(-1, f).sum(1)
        w *= f
    n = len(counts)
    start = levels if start is None else start
    if n <= start:
        return h.amax
    cums = np.concatenate([[0.0], np.cumsum(counts)])
    total = cums[-1]
    best_i, best_kl = n, math.inf
    for i in range(start, n + 1):
        p = counts[:i].copy()
        p[-1] += total - cums[i]
        # merge the i bins into `levels` groups (the group of bin j is j * levels // i)
        group = (np.arange(i) * levels) // i
        nonzero = counts[:i] > 0
        gmass = np.bincount(group, weights=counts[:i], minlength=levels)
        gcount = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, gmass[group] / np.maximum(gcount[group], 1), 0.0)
        kl = _kl(p, q)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(min(h.amax, best_i * w))


def _kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-4) -> float:
    """KL(P||Q) of two unnormalized histograms; zeros in Q where P has mass are smoothed by
    moving a little mass (eps) onto them, as the classic implementations do."""
    ps, qs = p.sum(), q.sum()
    if ps == 0 or qs == 0:
        return math.inf
    p = p / ps
    q = q / qs
    pz, qz = p == 0, q == 0
    if qz.any():
        n_zero, n_nonzero = int(qz.sum()), int((~qz).sum())
        if n_nonzero == 0:
            return math.inf
        q = np.where(qz, eps, q - eps * n_zero / n_nonzero)
        if (q <= 0).any():
            return math.inf
    m = ~pz
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


def threshold_mse(h: AbsHistogram, candidates: int = 512) -> float:
    """Threshold minimizing the expected squared error of symmetric INT8 quantization. Values
    below T are rounded to steps of T/127 (error: x^2 for values under half a step, else
    step^2/12); values above are clipped to T (error (x - T)^2). Bins stand for their centres."""
    counts, w = _trimmed(h)
    n = len(counts)
    centers = (np.arange(n) + 0.5) * w
    lo = max(1, n // 64)
    cand_bins = np.unique(np.linspace(lo, n, min(candidates, n - lo + 1)).round().astype(int))
    best_t, best_err = h.amax, math.inf
    for i in cand_bins:
        t = min(i * w, h.amax) if i == n else i * w
        step = t / QMAX
        inside = centers <= t
        small = centers < step / 2
        err_in = np.where(small, centers ** 2, step * step / 12.0)
        err = np.sum(counts * np.where(inside, err_in, (centers - t) ** 2))
        if err < best_err:
            best_t, best_err = t, err
    return float(best_t)


def threshold(h: AbsHistogram, method: str, percentile: float = 99.99) -> float:
    if method == "max":
        return threshold_max(h)
    if method == "percentile":
        return threshold_percentile(h, percentile)
    if method == "entropy":
        return threshold_entropy(h)
    if method == "mse":
        return threshold_mse(h)
    raise UserError(f"unknown --method {method!r} (choose {', '.join(METHODS)})")


# -- SmoothQuant ------------------------------------------------------------------------------
def smooth_factors(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float,
                   lo: float = 1e-2, hi: float = 1e2) -> np.ndarray:
    """SmoothQuant per-input-channel factors s = max|X|^alpha / max|W|^(1-alpha): the activation is
    divided by s and the weight rows multiplied by it. Clamped to [lo, hi]; channels never active
    (or with all-zero weights) keep s = 1."""
    a = np.asarray(act_absmax, np.float64)
    wmax = np.asarray(weight_absmax, np.float64)
    s = np.ones_like(a)
    ok = (a > 0) & (wmax > 0)
    s[ok] = a[ok] ** alpha / wmax[ok] ** (1 - alpha)
    return np.clip(s, lo, hi).astype(np.float32)


# -- weights ----------------------------------------------------------------------------------
def quantize_weight(w: np.ndarray, axis: int, scale_dtype, method: str = "max") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel INT8 of a 2-D weight; `axis` is the output-channel axis.
    Returns (int8 weight, scale [out] in scale_dtype). `method` = max (absmax / 127) or mse
    (per-channel clipping ratio from a small grid, minimizing the squared error)."""
    w = np.asarray(w, np.float32)
    red = 1 - axis
    amax = np.abs(w).max(axis=red)
    if method == "max":
        scale = amax / QMAX
    elif method == "mse":
        best = np.full(amax.shape, np.inf)
        scale = amax / QMAX
        for r in np.linspace(0.80, 1.0, 21):
            s = np.maximum(amax * r / QMAX, 1e-12)
            sb = np.expand_dims(s, red)
            err = ((np.clip(np.round(w / sb), -QMAX, QMAX) * sb - w) ** 2).sum(axis=red)
            better = err < best
            best = np.where(better, err, best)
            scale = np.where(better, s, scale)
    else:
        raise UserError(f"unknown --weight-method {method!r} (choose max, mse or gptq)")
    scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
    sb = np.expand_dims(scale.astype(np.float32), red)
    q = np.clip(np.round(w / sb), -QMAX, QMAX).astype(np.int8)
    return q, scale


@contextlib.contextmanager
def single_thread_blas():
    """OpenBLAS's threaded Cholesky/inverse ran 10x slower than one thread on our 2-core machines;
    hold OpenBLAS to one thread for them (best effort: a no-op where no OpenBLAS is found)."""
    fns = []
    try:
        with open("/proc/self/maps") as f:
            libs = {p[-1] for p in map(str.split, f) if len(p) >= 6 and "openblas" in p[-1].lower()}
        for path in sorted(libs):
            lib = ctypes.CDLL(path)
            for get, set_ in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                              ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                              ("openblas_get_num_threads", "openblas_set_num_threads")):
                if hasattr(lib, get) and hasattr(lib, set_):
                    fns.append((getattr(lib, get), getattr(lib, set_)))
                    break
    except OSError:
        fns = []
    saved = [(set_, get()) for get, set_ in fns]
    for set_, _ in saved:
        set_(1)
    try:
        yield
    finally:
        for set_, n in saved:
            set_(n)


def gptq_factor(hessian: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray] | None:
    """(U, dead input channels) for GPTQ from the input Hessian H = X^T X: U is the upper
    Cholesky factor of inv(H + damp * mean(diag H) * I), i.e. inv(H) = U^T U. None if H is not
    positive definite even after damping. One factor serves every linear reading the same input."""
    H = np.array(hessian, np.float64)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices(len(H))] += damp * float(np.mean(np.diag(H)))
    try:
        with single_thread_blas():
            # H = V V^T with V upper (Cholesky of H in reversed order); then inv(H) = U^T U for
            # U = inv(V), upper: one Cholesky and one triangular inverse, no general inverse
            m = np.linalg.cholesky(H[::-1, ::-1])
        return np.ascontiguousarray(_inv_lower(m)[::-1, ::-1]).astype(np.float32), dead
    except np.linalg.LinAlgError:
        return None


def _inv_lower(L: np.ndarray, base: int = 128) -> np.ndarray:
    """Inverse of a lower-triangular matrix by halves: [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]
    (matrix products only, which BLAS runs fast on any thread count)."""
    n = len(L)
    if n <= base:
        return np.tril(np.linalg.inv(L))
    k = n // 2
    ai, ci = _inv_lower(L[:k, :k], base), _inv_lower(L[k:, k:], base)
    out = np.zeros_like(L)
    out[:k, :k], out[k:, k:] = ai, ci
    out[k:, :k] = -(ci @ (L[k:, :k] @ ai))
    return out


def gptq_quantize(w: np.ndarray, axis: int, factor, scale_dtype, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-channel symmetric INT8 with GPTQ's rounding (Frantar et al., 2022): input channels
    are quantized one at a time and each one's rounding error is pushed onto the input channels
    not yet quantized, weighted by the inverse Hessian of the layer input (`factor` from
    gptq_factor). Scales are the plain absmax / 127 ones, so the result has exactly the format
    `quantize_weight` gives; only the rounding of each weight changes."""
    if factor is None:
        return quantize_weight(w, axis, scale_dtype, "max")
    U, dead = factor
    W = np.array(w, np.float32)
    if axis == 0:                     # work on [in, out]
        W = W.T.copy()
    K, N = W.shape
    if U.shape != (K, K):
        raise ValueError(f"Hessian factor {U.shape} does not match weight [{K}, {N}]")
    W[dead, :] = 0.0
    scale = np.abs(W).max(axis=0) / QMAX
    scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
    s = scale.astype(np.float32)
    Q = np.empty((K, N), np.int8)
    for b0 in range(0, K, block):
        gptq_round_block(W, U, Q, b0, min(b0 + block, K), s, -QMAX, QMAX)
    return (Q.T.copy() if axis == 0 else Q), scale


def gptq_round_block(W: np.ndarray, U: np.ndarray, Q: np.ndarray, b0: int, b1: int, s: np.ndarray,
                     lo: int, hi: int) -> None:
    """GPTQ's step over input channels [b0, b1) of W [in, out] (both updated in place): round each
    channel with scales `s` into Q, push its error, divided by the pivot of U (gptq_factor), onto the
    block's later channels, then the block's errors onto the channels after it."""
    Wb = W[b0:b1]
    err = np.empty_like(Wb)
    for i in range(b1 - b0):
        q = np.clip(np.round(Wb[i] / s), lo, hi)
        Q[b0 + i] = q
        e = (Wb[i] - q * s) / U[b0 + i, b0 + i]
        Wb[i + 1:] -= np.outer(U[b0 + i, b0 + i + 1: b1], e)
        err[i] = e
    if b1 < W.shape[0]:
        W[b1:] -= U[b0:b1, b1:].T @ err
