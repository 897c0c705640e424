"""The quantization schemes, each an object saying what it quantizes and how; the calibration code asks
these questions instead of comparing scheme names.

    w8a16  INT8 weights per output channel, float activations (TensorRT's weight-only INT8 GEMM)
    w8a8   INT8 weights and activations (per-tensor activation scales, SmoothQuant), int8 GEMMs
    w4a16  INT4 weights in blocks of --block-size input channels (RTN, AWQ, GPTQ), float activations;
           the ONNX Runtime flavor reads them through MatMulNBits
"""
from __future__ import annotations

from dataclasses import dataclass

from ..runtime.errors import UserError


@dataclass(frozen=True)
class Scheme:
    name: str
    weight_bits: int                 # 8 or 4
    activation_bits: int | None      # 8: activations quantized too; None: they stay float
    default_bound: float             # --max-ppl-ratio default: perplexity ratio to the float bundle
    searches_keep_fp: bool           # --keep-fp auto searches the layers to keep in float when the check misses

    @property
    def blocked(self) -> bool:
        """INT4: per-block scales, --weights chooses the method, the ONNX Runtime graph gets MatMulNBits."""
        return self.weight_bits == 4

    @property
    def quantizes_activations(self) -> bool:
        return self.activation_bits is not None

    @property
    def weight_dtype(self) -> str:
        return f"int{self.weight_bits}"


SCHEMES = {scheme.name: scheme for scheme in (
    Scheme("w8a16", 8, None, 1.01, searches_keep_fp=False),
    Scheme("w8a8", 8, 8, 1.05, searches_keep_fp=True),
    Scheme("w4a16", 4, None, 1.08, searches_keep_fp=True),
)}


def scheme_named(name: str) -> Scheme:
    if name not in SCHEMES:
        raise UserError(f"unknown --scheme {name!r} (choose {' or '.join(SCHEMES)})")
    return SCHEMES[name]
