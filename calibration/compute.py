"""Where the weight arithmetic runs: numpy (the reference), or torch on the CPU or a CUDA GPU.

The INT4 and GPTQ arithmetic of an 8B model is hours of single-threaded numpy: AWQ's alpha search alone
multiplies each group's X^T X by its weight error ten times (about 30 TFLOP per Llama-3-8B layer), and
GPTQ's Cholesky factors of 14336-wide Hessians are float64. `Ops` bundles the functions the quantizers
call (int4.py, stats.py); `ops_for(name)` picks numpy or a torch device, "auto" being CUDA when torch
sees a GPU and numpy otherwise (so a machine without a GPU computes exactly what it always did).

What torch computes, against numpy:
  round to nearest (RTN, the 8-bit head)   bit-identical: the same float32 divisions, absmax and
                                           round-half-even, element by element
  AWQ's error per alpha, clipping search   the same formulas; sums and matrix products in another order
  GPTQ (factor, rounding)                  the factor in float64 (torch.linalg), the rounding loop the
                                           same; the error pushed onto later blocks is a matrix product
so AWQ's chosen alpha and clipping ratios and GPTQ's roundings agree except at near-ties
(tests/test_quant_memory.py bounds it: same alphas, <= 0.1 % of INT4 values moved by one step, output
error within 1 %). Matrix products never use TF32 here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import int4, stats
from ..runtime.errors import UserError

CHOICES = ("auto", "numpy", "torch", "cuda")


@dataclass(frozen=True)
class Ops:
    """The weight arithmetic the quantizers call, on one backend."""
    name: str                  # numpy | torch (CPU) | cuda
    quantize_rtn: object       # (w_oi, block, clip=1.0, qmax=7) -> Int4Weight
    search_clip: object        # (w_oi, block, hessian | None) -> ratios [out, n_blocks]
    awq_factors: object        # (w_io, hessian, block, act_rms, expand) -> (s, alpha, errors)
    quantize_gptq: object      # (w_io, factor, block, clip) -> Int4Weight
    gptq_factor: object        # (hessian) -> (U, dead) | None
    gptq_quantize: object      # (w, axis, factor, scale_dtype) -> (int8, scale): INT8 GPTQ


NUMPY = Ops("numpy", int4.quantize_rtn, int4.search_clip, int4.awq_factors, int4.quantize_gptq,
            stats.gptq_factor, stats.gptq_quantize)


def ops_for(choice: str = "auto") -> Ops:
    """The Ops of a --compute choice (auto: cuda when torch sees a GPU, else numpy)."""
    if choice not in CHOICES:
        raise UserError(f"unknown --compute {choice!r} (choose {', '.join(CHOICES)})")
    if choice == "numpy":
        return NUMPY
    try:
        import torch
    except ImportError:
        if choice == "auto":
            return NUMPY
        raise UserError(f"--compute {choice} needs torch (pip install torch)") from None
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "numpy"
        if choice == "numpy":
            return NUMPY
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--compute cuda: torch sees no CUDA GPU")
    return TorchOps(torch, "cuda" if choice == "cuda" else "cpu").ops()


class TorchOps:
    """The same arithmetic as int4.py / stats.py in torch on `device` (numpy in, numpy out)."""

    def __init__(self, torch, device: str):
        self.torch, self.device = torch, torch.device(device)
        torch.backends.cuda.matmul.allow_tf32 = False          # fp32 products in fp32, as numpy does
        torch.backends.cudnn.allow_tf32 = False

    def ops(self) -> Ops:
        return Ops("cuda" if self.device.type == "cuda" else "torch", self.quantize_rtn, self.search_clip,
                   self.awq_factors, self.quantize_gptq, self.gptq_factor, self.gptq_quantize)

    def t(self, a, dtype=None):
        torch = self.torch
        if isinstance(a, torch.Tensor):
            return a.to(self.device, dtype or a.dtype)
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dtype or torch.float32)

    @staticmethod
    def np(x) -> np.ndarray:
        return x.detach().cpu().numpy()

    # -- round to nearest (bit-identical to int4.quantize_rtn) ------------------------------------
    def _blocks(self, w, block: int):
        """[out, k] -> [out, n_blocks, block], zero padded (as int4._padded_blocks)."""
        out, k = w.shape
        nb = int4.n_blocks(k, block)
        if nb * block != k:
            w = self.torch.nn.functional.pad(w, (0, nb * block - k))
        return w.reshape(out, nb, block)

    def rtn(self, w, block: int, clip=1.0, qmax: int = int4.QMAX):
        """(q int8 [out, k], scales float32 [out, n_blocks]) as tensors."""
        torch = self.torch
        out, k = w.shape
        wb = self._blocks(w, block)
        amax = wb.abs().amax(dim=2) * (self.t(clip) if isinstance(clip, np.ndarray) else clip)
        scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        q = torch.clamp(torch.round(wb / scales[:, :, None]), -qmax - 1, qmax).to(torch.int8)
        return q.reshape(out, -1)[:, :k], scales

    def quantize_rtn(self, w_oi, block: int, clip=1.0, qmax: int = int4.QMAX) -> int4.Int4Weight:
        q, s = self.rtn(self.t(w_oi), block, clip, qmax)
        return int4.Int4Weight(self.np(q), self.np(s), block)

    def _dequantize(self, q, scales, block: int):
        k = q.shape[1]
        return q.float() * scales.repeat_interleave(block, dim=1)[:, :k]

    # -- clipping search --------------------------------------------------------------------------
    def _diag_blocks(self, hessian, k: int, block: int):
        """[n_blocks, block, block]: H's diagonal blocks (identity without H), zero padded."""
        torch = self.torch
        nb = int4.n_blocks(k, block)
        hb = torch.zeros((nb, block, block), dtype=torch.float32, device=self.device)
        for b in range(nb):
            k0, k1 = b * block, min((b + 1) * block, k)
            hb[b, : k1 - k0, : k1 - k0] = torch.eye(k1 - k0, device=self.device) if hessian is None \
                else hessian[k0:k1, k0:k1]
        return hb

    def clip_ratios(self, w, block: int, hessian=None):
        """int4.search_clip on tensors: w [out, k], hessian [k, k] tensor or None."""
        torch = self.torch
        out, k = w.shape
        wb = self._blocks(w, block)
        hb = self._diag_blocks(hessian, k, block)
        amax = wb.abs().amax(dim=2)
        best_err = torch.full(amax.shape, float("inf"), dtype=torch.float32, device=self.device)
        best = torch.ones(amax.shape, dtype=torch.float32, device=self.device)
        for r in int4.CLIP_RATIOS:
            s = torch.where(amax > 0, amax * r / int4.QMAX, torch.ones_like(amax))[:, :, None]
            e = wb - torch.clamp(torch.round(wb / s), -8, int4.QMAX) * s
            err = torch.einsum("obi,bij,obj->ob", e, hb, e)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(best, r), best)
        return best

    def search_clip(self, w_oi, block: int, hessian) -> np.ndarray:
        return self.np(self.clip_ratios(self.t(w_oi), block, None if hessian is None else self.t(hessian)))

    # -- AWQ --------------------------------------------------------------------------------------
    def awq_factors(self, w_io, hessian, block: int, act_rms, expand=None):
        """int4.awq_factors: the factors of each alpha are computed in numpy (a vector), the rounding
        and the output error tr(E^T H E) in torch."""
        expand = expand or (lambda v: v)
        W, H = self.t(w_io), self.t(hessian)
        rms = np.maximum(act_rms.astype(np.float64), 1e-8)
        errors, best = {}, (np.inf, None, 0.0)
        for alpha in int4.AWQ_ALPHAS:
            s = rms ** alpha
            s = expand((s / np.exp(np.mean(np.log(s)))).astype(np.float32))
            st = self.t(s)[:, None]
            q, sc = self.rtn((W * st).T, block)
            e = W - self._dequantize(q, sc, block).T / st
            err = float(self.torch.sum(e * (H @ e)))
            errors[float(alpha)] = err
            if err < best[0]:
                best = (err, s, float(alpha))
        base = errors[0.0] or 1.0
        return best[1], best[2], {a: round(e / base, 5) for a, e in errors.items()}

    # -- GPTQ -------------------------------------------------------------------------------------
    def gptq_factor(self, hessian, damp: float = 0.01):
        """stats.gptq_factor: (U upper with inv(H + damp) = U^T U, dead channels) or None."""
        torch = self.torch
        H = self.t(hessian, torch.float64).clone()
        dead = torch.diag(H) <= 0
        idx = torch.nonzero(dead).flatten()
        H[idx, idx] = 1.0
        H.diagonal().add_(damp * float(torch.mean(torch.diag(H))))
        L, info = torch.linalg.cholesky_ex(torch.flip(H, (0, 1)))
        if int(info):
            return None
        inv = torch.linalg.solve_triangular(L, torch.eye(len(H), dtype=torch.float64, device=self.device), upper=False)
        return torch.flip(inv, (0, 1)).float().contiguous(), self.np(dead)

    def _round_block(self, W, U, Q, b0: int, b1: int, s, lo: int, hi: int) -> None:
        """stats.gptq_round_block on tensors."""
        torch = self.torch
        Wb = W[b0:b1]
        err = torch.empty_like(Wb)
        for i in range(b1 - b0):
            q = torch.clamp(torch.round(Wb[i] / s), lo, hi)
            Q[b0 + i] = q.to(torch.int8)
            e = (Wb[i] - q * s) / U[b0 + i, b0 + i]
            Wb[i + 1:] -= torch.outer(U[b0 + i, b0 + i + 1: b1], e)
            err[i] = e
        if b1 < W.shape[0]:
            W[b1:] -= U[b0:b1, b1:].T @ err

    def _factor(self, factor):
        U, dead = factor
        return self.t(U), self.t(dead, self.torch.bool) if isinstance(dead, np.ndarray) else dead

    def quantize_gptq(self, w_io, factor, block: int, clip: bool = False) -> int4.Int4Weight:
        """int4.quantize_gptq on `device`."""
        torch = self.torch
        if factor is None:
            w_oi = np.asarray(w_io, np.float32).T
            return self.quantize_rtn(w_oi, block, self.search_clip(w_oi, block, None) if clip else 1.0)
        U, dead = self._factor(factor)
        W = self.t(w_io).clone()
        K, N = W.shape
        if U.shape != (K, K):
            raise ValueError(f"Hessian factor {tuple(U.shape)} does not match weight [{K}, {N}]")
        W[dead, :] = 0.0
        Q = torch.empty((K, N), dtype=torch.int8, device=self.device)
        scales = torch.empty((N, int4.n_blocks(K, block)), dtype=torch.float32, device=self.device)
        for b, b0 in enumerate(range(0, K, block)):
            b1 = min(b0 + block, K)
            Wb = W[b0:b1]
            amax = Wb.abs().amax(dim=0) * (self.clip_ratios(Wb.T, b1 - b0)[:, 0] if clip else 1.0)
            s = torch.where(amax > 0, amax / int4.QMAX, torch.ones_like(amax))
            scales[:, b] = s
            self._round_block(W, U, Q, b0, b1, s, -8, int4.QMAX)
        return int4.Int4Weight(np.ascontiguousarray(self.np(Q).T), self.np(scales), block)

    def gptq_quantize(self, w, axis: int, factor, scale_dtype, block: int = 32):
        """stats.gptq_quantize (INT8, per output channel) on `device`."""
        torch = self.torch
        if factor is None:
            return stats.quantize_weight(w, axis, scale_dtype, "max")
        U, dead = self._factor(factor)
        W = self.t(w).clone()
        if axis == 0:
            W = W.T.contiguous()
        K, N = W.shape
        if U.shape != (K, K):
            raise ValueError(f"Hessian factor {tuple(U.shape)} does not match weight [{K}, {N}]")
        W[dead, :] = 0.0
        scale = self.np(W.abs().amax(dim=0)) / stats.QMAX
        scale = np.where(scale > 0, scale, 1.0).astype(scale_dtype)
        s = self.t(scale.astype(np.float32))
        Q = torch.empty((K, N), dtype=torch.int8, device=self.device)
        for b0 in range(0, K, block):
            self._round_block(W, U, Q, b0, min(b0 + block, K), s, -stats.QMAX, stats.QMAX)
        q = self.np(Q)
        return (np.ascontiguousarray(q.T) if axis == 0 else q), scale
