"""What the keep-in-float search (sensitivity.py) and the bundle writer (write.py) read of a calibration
run: declared here so that they depend on this, not on quantize.py, which calls them (no import circle)."""
from __future__ import annotations

from typing import Protocol


class CalibrationRun(Protocol):
    bundle: object                   # runtime.bundle.Bundle: the float bundle being calibrated
    cfg: object                      # quantize.CalibConfig
    source: object                   # source.SourceModel: its graphs, linears and weights
    record: object                   # quantize.CalibrationRecord: what the run measured
    ops: object                      # compute.Ops: the weight arithmetic used
    check: object                    # the perplexity check's windows

    def perplexity(self, plan, label: str, windows=None) -> float:
        """Perplexity of the bundle quantized by `plan` (None: float) on `windows` (default: the check's)."""

    def quant_plan(self, units):
        """The quantization plan of these units (layers)."""

    def units_to_quantize(self, kept: set[int]):
        """Every unit but the layers kept in float."""
