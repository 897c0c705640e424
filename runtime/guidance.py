"""Classifier-free guidance and sampling inside the visual-token range.

Guidance combines the logits of a conditional and an unconditional row: `uncond + s * (cond - uncond)`
(LlamaGen). Emu3 and Emu3.5 write it on log-softmax values, `lsm(u) + s * (lsm(c) - lsm(u))`; the two
differ by a constant per row, which softmax, temperature, top-k and top-p all ignore, so they sample
the same distribution. Restricting to the visual range first is exact for the same reason: the
masked-out ids would get -inf (probability 0) anyway, so we slice [lo, hi) before anything else and
never touch the rest of the vocabulary (a 5.6x smaller row for Emu3, 2.2x for Emu3.5).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .sampling import Sampler, SamplingConfig
from .errors import UserError

SCHEDULES = ("constant", "linear")


@dataclass
class Guidance:
    scale: float = 1.0           # 1.0: off (no unconditional rows are run)
    interval: int = -1           # LlamaGen's cfg_interval: -1 always; N >= 0: image tokens 0..N+1 only
    schedule: str = "constant"   # "linear": 1 at the first image token rising to `scale` at the last

    def __post_init__(self):
        if self.scale < 0:
            raise UserError(f"cfg scale must be >= 0 (got {self.scale})")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown cfg schedule {self.schedule!r} (choose {', '.join(SCHEDULES)})")
        if self.interval < -1:
            raise UserError(f"cfg interval must be -1 (always) or >= 0 (got {self.interval})")

    @property
    def active(self) -> bool:
        return self.scale != 1.0

    def scale_at(self, index: int, total: int) -> float:
        """Guidance scale for image token `index` of `total`.

        LlamaGen counts its cfg_interval in decode steps: token 0 comes from the prefill and is always
        guided, decode step i (token i+1) is guided while i <= cfg_interval.
        """
        if self.interval >= 0 and index > self.interval + 1:
            return 1.0
        if self.schedule == "linear" and total > 1:
            return 1.0 + (self.scale - 1.0) * index / (total - 1)
        return self.scale


def guide(cond: np.ndarray, uncond: np.ndarray | None, scale: float) -> np.ndarray:
    """uncond + scale * (cond - uncond), in the logits' float32 (a new array)."""
    if uncond is None or scale == 1.0:
        return np.array(cond, dtype=np.float32, copy=True)
    return uncond + (cond - uncond) * np.float32(scale)


class RangeSampler:
    """Samples ids in [lo, hi) from logits already sliced to that range; the per-image generators are
    shared with other RangeSamplers (text vs visual settings) so one seed gives one stream per image."""

    def __init__(self, cfg: SamplingConfig, lo: int, hi: int, rngs: list[np.random.Generator]):
        self.lo, self.hi = lo, hi
        self.sampler = Sampler(cfg, len(rngs))
        self.sampler.rngs = rngs

    def __call__(self, sliced: np.ndarray) -> np.ndarray:
        if sliced.shape[-1] != self.hi - self.lo:
            raise ValueError(f"expected logits of the range [{self.lo}, {self.hi}), got {sliced.shape[-1]} columns")
        return self.sampler(sliced, [[] for _ in range(len(sliced))]) + self.lo


def image_generators(seed: int | None, first: int, count: int) -> list[np.random.Generator]:
    """Image k (counted over the whole request) draws from seed + k, whatever the batching."""
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % (1 << 63))
    return [np.random.default_rng(seed + first + i) for i in range(count)]
