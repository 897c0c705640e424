"""INT4 weight-only quantization (w4a16): one in-memory format, the three ways of filling it, and its
layouts on disk.

Format (`Int4Weight`): signed 4-bit values q in [-8, 7] laid out [out, in], one float scale per
output channel and block of `block` consecutive input channels (calibrate asks for whole blocks,
as TensorRT does; the functions here also take a shorter last block, as ONNX Runtime does),
zero point 0: w ~= q * scale. Symmetric, because TensorRT's parser refuses non-zero zero points
(docs/CALIBRATION.md); the scale is absmax / 7, so -8 is never produced by rounding.

Ways of filling it (all reuse calibration's statistics: X^T X of each linear's input, collected once):
  rtn    round to nearest with the absmax scale of each block
  awq    activation-aware scaling (Lin et al., 2023): input channels that carry large activations get
         their weights scaled up by s (and the activation divided by s, folded into the RMSNorm
         scale or the previous linear like SmoothQuant, so the graph stays a plain DQ -> MatMul);
         s = rms(x)^alpha, alpha searched per group on the output error tr(E^T H E); then a
         per-block clipping ratio searched on the same error (the block's part of H)
  gptq   GPTQ rounding (Frantar et al., 2022) per block: each block's scale is taken from the
         weights as they are when the block is reached (earlier errors already pushed onto them)

Layouts (`pack_*`): the portable graphs' ONNX INT4 initializer [in, out] (two values per byte, the
first in the low nibble) read by DequantizeLinear(axis=0, block_size); and ONNX Runtime's MatMulNBits
blobs [out, n_blocks, block / 2] (unsigned, value + 8).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime.errors import UserError
from .stats import gptq_round_block

QMAX = 7
BLOCK_SIZES = (16, 32, 64, 128)
AWQ_ALPHAS = tuple(np.round(np.arange(0.0, 1.0, 0.1), 2))
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.875, 0.85, 0.8, 0.75, 0.7)      # 0.875: absmax / 8, llama.cpp Q4_0's step


@dataclass
class Int4Weight:
    q: np.ndarray           # int8 [out, in], values in [-8, 7]
    scales: np.ndarray      # float32 [out, n_blocks]
    block: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]

    def dequantize(self) -> np.ndarray:
        """float32 [out, in]."""
        return self.q.astype(np.float32) * expand_blocks(self.scales, self.block, self.q.shape[1])


def n_blocks(k: int, block: int) -> int:
    return -(-k // block)


def expand_blocks(scales: np.ndarray, block: int, k: int) -> np.ndarray:
    """[out, n_blocks] -> [out, k]: each block's scale repeated over its input channels."""
    return np.repeat(scales, block, axis=1)[:, :k]


def check_block(k: int, block: int, name: str = "weight") -> None:
    if block not in BLOCK_SIZES:
        raise UserError(f"--block-size {block}: choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if k % block:       # TensorRT's parser: "The quantization axis must divide into whole blocks"
        raise UserError(f"{name}: {k} input channels are not a whole number of blocks of --block-size {block} "
                        f"(TensorRT refuses a partial last block)")


# -- round to nearest ---------------------------------------------------------------------------------
def _padded_blocks(w_oi: np.ndarray, block: int) -> np.ndarray:
    """[out, in] -> [out, n_blocks, block], zero padded."""
    out, k = w_oi.shape
    nb = n_blocks(k, block)
    wp = np.zeros((out, nb * block), np.float32)
    wp[:, :k] = w_oi
    return wp.reshape(out, nb, block)


def block_scales(w_oi: np.ndarray, block: int, clip: np.ndarray | float = 1.0, qmax: int = QMAX) -> np.ndarray:
    """absmax / qmax of each block (times a clipping ratio), [out, n_blocks] float32; never 0."""
    amax = np.abs(_padded_blocks(w_oi, block)).max(axis=2) * clip
    return np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)


def round_blocks(w_oi: np.ndarray, scales: np.ndarray, block: int, qmax: int = QMAX) -> np.ndarray:
    s = expand_blocks(scales, block, w_oi.shape[1])
    return np.clip(np.round(w_oi / s), -qmax - 1, qmax).astype(np.int8)


def quantize_rtn(w_oi: np.ndarray, block: int, clip: np.ndarray | float = 1.0, qmax: int = QMAX) -> Int4Weight:
    """Round to nearest with per-block absmax scales (times `clip`, [out, n_blocks] or a number);
    qmax 127 gives the same layout in 8 bits (the quantized head, head.py)."""
    w = np.asarray(w_oi, np.float32)
    out, k = w.shape
    if k % block:
        scales = block_scales(w, block, clip, qmax)
        return Int4Weight(round_blocks(w, scales, block, qmax), scales, block)
    # whole blocks: one contiguous [out, n_blocks, block] copy, scales broadcast (the same values as above)
    wb = np.ascontiguousarray(w).reshape(out, k // block, block)
    amax = np.abs(wb).max(axis=2) * clip
    scales = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    t = wb / scales[:, :, None]
    np.round(t, out=t)
    np.clip(t, -qmax - 1, qmax, out=t)
    return Int4Weight(t.astype(np.int8).reshape(out, k), scales, block)


# -- AWQ --------------------------------------------------------------------------------------------
def output_error(w_io: np.ndarray, wq_io: np.ndarray, hessian: np.ndarray) -> float:
    """tr(E^T H E) for E = W - Wq ([in, out]): the summed squared output error over the data H = X^T X came from."""
    e = (w_io - wq_io).astype(np.float32)
    return float(np.einsum("ij,ij->", e, hessian @ e))


def awq_factors(w_io: np.ndarray, hessian: np.ndarray, block: int, act_rms: np.ndarray,
                expand=None) -> tuple[np.ndarray, float, dict]:
    """(per-input-channel factors s, chosen alpha, alpha -> relative error) for one group's weights
    [in, out] (its linears side by side): s = act_rms^alpha normalized to geometric mean 1, alpha
    from AWQ_ALPHAS minimizing tr(E^T H E) of the scaled-then-quantized-then-unscaled weights.
    `expand` maps a reduced factor vector to the input channels (GQA: one factor per KV head and dim)."""
    expand = expand or (lambda v: v)
    rms = np.maximum(act_rms.astype(np.float64), 1e-8)
    errors, best = {}, (np.inf, None, 0.0)
    for alpha in AWQ_ALPHAS:
        s = rms ** alpha
        s = expand((s / np.exp(np.mean(np.log(s)))).astype(np.float32))
        wq = quantize_rtn((w_io * s[:, None]).T, block).dequantize().T / s[:, None]
        err = output_error(w_io, wq, hessian)
        errors[float(alpha)] = err
        if err < best[0]:
            best = (err, s, float(alpha))
    base = errors[0.0] or 1.0
    return best[1], best[2], {a: round(e / base, 5) for a, e in errors.items()}


def search_clip(w_oi: np.ndarray, block: int, hessian: np.ndarray | None) -> np.ndarray:
    """Per (output channel, block) clipping ratio from CLIP_RATIOS minimizing the block's output
    error e^T H_bb e (H_bb: the block's diagonal part of X^T X; identity without data)."""
    out, k = w_oi.shape
    nb = n_blocks(k, block)
    wb = _padded_blocks(w_oi, block)                                   # [out, nb, block]
    hb = np.zeros((nb, block, block), np.float32)
    for b in range(nb):
        k0, k1 = b * block, min((b + 1) * block, k)
        hb[b, : k1 - k0, : k1 - k0] = np.eye(k1 - k0) if hessian is None else hessian[k0:k1, k0:k1]
    amax = np.abs(wb).max(axis=2)
    best_err = np.full((out, nb), np.inf, np.float32)
    best = np.ones((out, nb), np.float32)
    for r in CLIP_RATIOS:
        s = np.where(amax > 0, amax * r / QMAX, 1.0)[:, :, None]
        e = wb - np.clip(np.round(wb / s), -8, QMAX) * s
        err = np.einsum("obi,bij,obj->ob", e, hb, e)
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, r, best)
    return best


# -- GPTQ -------------------------------------------------------------------------------------------
def quantize_gptq(w_io: np.ndarray, factor, block: int, clip: bool = False) -> Int4Weight:
    """GPTQ on [in, out] with per-block scales; `factor` = stats.gptq_factor(H) (None: round to nearest).
    Input channels are quantized in order; each one's rounding error, divided by the inverse
    Hessian's pivot, is pushed onto the channels not yet quantized (within the block at once, onto
    later blocks once the block is done). clip: each block's scales minimize the squared error of
    the block's weights as they are when it is reached (search_clip), instead of absmax / 7."""
    if factor is None:
        w_oi = np.asarray(w_io, np.float32).T
        return quantize_rtn(w_oi, block, search_clip(w_oi, block, None) if clip else 1.0)
    U, dead = factor
    W = np.array(w_io, np.float32)
    K, N = W.shape
    if U.shape != (K, K):
        raise ValueError(f"Hessian factor {U.shape} does not match weight [{K}, {N}]")
    W[dead, :] = 0.0
    Q = np.empty((K, N), np.int8)
    scales = np.empty((N, n_blocks(K, block)), np.float32)
    for b, b0 in enumerate(range(0, K, block)):
        b1 = min(b0 + block, K)
        Wb = W[b0:b1]
        amax = np.abs(Wb).max(axis=0) * (search_clip(Wb.T, b1 - b0, None)[:, 0] if clip else 1.0)
        s = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
        scales[:, b] = s
        gptq_round_block(W, U, Q, b0, b1, s, -8, QMAX)
    return Int4Weight(np.ascontiguousarray(Q.T), scales, block)


# -- layouts ----------------------------------------------------------------------------------------
def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Flat 4-bit values (signed or unsigned, any int array) -> uint8, two per byte, first in the low nibble."""
    v = (np.asarray(values).reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if v.size % 2:
        v = np.append(v, np.uint8(0))
    return v[0::2] | (v[1::2] << 4)


def unpack_nibbles(packed: np.ndarray, count: int, signed: bool = True) -> np.ndarray:
    p = np.asarray(packed, np.uint8).reshape(-1)
    v = np.empty(p.size * 2, np.int8)
    v[0::2], v[1::2] = p & 0xF, p >> 4
    v = v[:count]
    return np.where(v > 7, v - 16, v).astype(np.int8) if signed else v


def pack_onnx(w: Int4Weight, out_axis: int, scale_dtype) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """(packed bytes, logical shape, scales) of the portable graphs' INT4 initializer in the stored
    layout: [in, out] (out_axis 1, DequantizeLinear axis 0, scales [n_blocks, out]) or [out, in]
    (out_axis 0: the tied head, axis 1, scales [out, n_blocks])."""
    q, s = (w.q.T, w.scales.T) if out_axis == 1 else (w.q, w.scales)
    return pack_nibbles(q), tuple(q.shape), np.ascontiguousarray(s).astype(scale_dtype)


def unpack_onnx(packed: np.ndarray, shape: tuple[int, int], scales: np.ndarray, block: int,
                out_axis: int) -> Int4Weight:
    q = unpack_nibbles(packed, shape[0] * shape[1]).reshape(shape)
    s = np.asarray(scales, np.float32)
    return Int4Weight(np.ascontiguousarray(q.T), np.ascontiguousarray(s.T), block) if out_axis == 1 \
        else Int4Weight(q, s, block)


def pack_matmulnbits(w: Int4Weight, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """(B uint8 [out, n_blocks, block / 2], scales [out * n_blocks]) as MatMulNBits (bits=4, no
    zero points: its default zero point is 8) reads them."""
    out, k = w.shape
    nb = w.n_blocks
    u = np.zeros((out, nb * w.block), np.int16)
    u[:, :k] = w.q.astype(np.int16) + 8
    u[:, k:] = 8                                                   # padding dequantizes to 0
    return pack_nibbles(u).reshape(out, nb, w.block // 2), w.scales.reshape(-1).astype(scale_dtype)
