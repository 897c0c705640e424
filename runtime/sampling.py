"""Sampling on a [B, vocab] float32 logits array: a chain of logits processors, then greedy or a draw.

Every filter follows the definition of the matching `transformers` processor/warper, so the same
settings give the same distribution: repetition penalty, temperature, top-k, top-p, min-p (applied
in that order). Removed entries become -inf. Later features (classifier-free guidance, restricting
to a token range, per-range parameters) are more processors in the same chain.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .backends.base import argmax_rows
from .errors import UserError

NEG_INF = -np.inf
# Below this, logits / temperature overflow float32 (1e-300 is 0 in float32): such temperatures are
# greedy, which is also what they tend to as they shrink.
MIN_TEMPERATURE = 1e-5


class NonFiniteLogits(UserError):
    """A graph gave NaN or infinite logits (damaged weights, or a dtype too narrow for the model)."""


def check_finite(logits, step: int) -> None:
    """Refuse NaN or +inf logits of step `step` (0: the prompt), or a row without any finite one, which
    would otherwise give a token silently (argmax picks the first NaN). -inf stays allowed: it is how
    a caller masks ids out. Logits still on a GPU are left to the device."""
    if not isinstance(logits, np.ndarray) or np.isfinite(logits).all():
        return
    rows = logits.reshape(len(logits), -1)
    bad = (np.isnan(rows) | np.isposinf(rows)).any(axis=-1) | np.isneginf(rows).all(axis=-1)
    if bad.any():
        what = "the prompt" if step == 0 else f"decode step {step}"
        raise NonFiniteLogits(f"the graph's logits for {what} are not finite (NaN or inf, row {int(np.argmax(bad))}): "
                              f"the bundle's weights are damaged or overflow its dtype (check it with "
                              f"`ardeploy verify`, or export in fp32)")


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0               # 0: off
    top_p: float = 1.0           # 1.0: off
    min_p: float = 0.0           # 0.0: off
    repetition_penalty: float = 1.0
    seed: int | None = None      # row r draws from seed + r
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    eos_ids: list[int] | None = None   # None: the bundle's

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self._check_types()
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens (--max-new-tokens) must be at least 1 (got {self.max_new_tokens})")
        if not 0 <= self.temperature < float("inf"):
            raise UserError(f"temperature (--temperature) must be >= 0 and finite (got {self.temperature})")
        if self.top_k < 0:
            raise UserError(f"top_k (--top-k) must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p (--top-p) must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.min_p <= 1:
            raise UserError(f"min_p (--min-p) must be in [0, 1] (got {self.min_p})")
        if not 0 < self.repetition_penalty < float("inf"):
            raise UserError(f"repetition_penalty (--repetition-penalty) must be > 0 and finite "
                            f"(got {self.repetition_penalty})")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise UserError(f"seed (--seed) must be a non-negative integer (got {self.seed})")

    def _check_types(self) -> None:
        """Python callers get ardeploy's own error for a value of the wrong type, not numpy's."""
        for name, kind in (("max_new_tokens", "an integer"), ("top_k", "an integer"), ("seed", "an integer or None"),
                           ("temperature", "a number"), ("top_p", "a number"), ("min_p", "a number"),
                           ("repetition_penalty", "a number"), ("greedy", "True or False"),
                           ("ignore_eos", "True or False")):
            value = getattr(self, name)
            if not _is_a(value, kind):
                raise UserError(f"{name} (--{name.replace('_', '-')}) must be {kind} (got {value!r})")
        if isinstance(self.stop, str) or not all(isinstance(stop, str) for stop in self.stop):
            raise UserError(f"stop (--stop) must be a list of strings (got {self.stop!r})")
        if self.eos_ids is not None and not all(_is_a(token, "an integer") for token in self.eos_ids):
            raise UserError(f"eos_ids must be a list of token ids or None (got {self.eos_ids!r})")

    @property
    def is_greedy(self) -> bool:
        """--greedy, or a temperature too small to divide by (MIN_TEMPERATURE)."""
        return self.greedy or self.temperature < MIN_TEMPERATURE


def _is_a(value, kind: str) -> bool:
    if kind == "True or False":
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if kind == "an integer or None":
        return value is None or isinstance(value, numbers.Integral)
    return isinstance(value, numbers.Integral if kind == "an integer" else numbers.Real)


class LogitsProcessor(Protocol):
    def __call__(self, logits: np.ndarray, history: list[list[int]]) -> np.ndarray:
        """logits [B, V] (may be modified in place and returned); history: each row's tokens so far."""


def softmax(x: np.ndarray) -> np.ndarray:
    exp = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """Tokens already seen: positive logits divided by `penalty`, negative ones multiplied."""
    def apply(logits, history):
        for row, seen in enumerate(history):
            if seen:
                ids = np.unique(np.asarray(seen, dtype=np.int64))
                values = logits[row, ids]
                with np.errstate(over="ignore", divide="ignore"):     # overflow: see overflow_to_limit
                    logits[row, ids] = np.where(values < 0, values * penalty, values / penalty)
        return logits
    return apply


def temperature(value: float) -> LogitsProcessor:
    return lambda logits, history: np.divide(logits, value, out=logits)


def top_k(k: int) -> LogitsProcessor:
    """Keep the k largest; entries tied with the k-th value are kept too."""
    def apply(logits, history):
        kept = min(k, logits.shape[-1])
        kth = np.partition(logits, -kept, axis=-1)[:, -kept][:, None]
        logits[logits < kth] = NEG_INF
        return logits
    return apply


def top_p(p: float) -> LogitsProcessor:
    """Nucleus: drop the least likely tokens whose cumulative probability stays <= 1 - p (at least one kept)."""
    def apply(logits, history):
        order = np.argsort(logits, axis=-1, kind="stable")          # ascending
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        cum = np.cumsum(softmax(sorted_logits), axis=-1)
        drop_sorted = cum <= (1 - p)
        drop_sorted[:, -1] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        logits[drop] = NEG_INF
        return logits
    return apply


def min_p(p: float) -> LogitsProcessor:
    """Drop tokens whose probability is below p times the most likely token's."""
    def apply(logits, history):
        probs = softmax(logits)
        threshold = p * probs.max(axis=-1, keepdims=True)
        drop = probs < threshold
        logits[drop] = NEG_INF
        return logits
    return apply


def processors_for(cfg: SamplingConfig) -> list[LogitsProcessor]:
    chain: list[LogitsProcessor] = []
    if cfg.repetition_penalty != 1.0:
        chain.append(repetition_penalty(cfg.repetition_penalty))
    if cfg.is_greedy:
        return chain
    if cfg.temperature != 1.0:
        chain.append(temperature(cfg.temperature))
    if cfg.top_k:
        chain.append(top_k(cfg.top_k))
    if cfg.top_p < 1.0:
        chain.append(top_p(cfg.top_p))
    if cfg.min_p > 0.0:
        chain.append(min_p(cfg.min_p))
    return chain


def overflow_to_limit(processed: np.ndarray) -> np.ndarray:
    """Rows where a processor overflowed to +inf (a tiny repetition penalty dividing a positive logit)
    keep only those entries, equally likely: the limit of the distribution, where softmax would give NaN."""
    overflowed = np.isposinf(processed).any(axis=-1)
    if overflowed.any():
        rows = processed[overflowed]
        processed[overflowed] = np.where(np.isposinf(rows), 0.0, NEG_INF)
    return processed


class Sampler:
    """Processors then greedy argmax or one draw per row from that row's own generator."""

    def __init__(self, cfg: SamplingConfig, batch: int, extra: list[LogitsProcessor] | None = None):
        self.cfg = cfg
        self.chain = list(extra or []) + processors_for(cfg)
        seed = cfg.seed if cfg.seed is not None else int(np.random.SeedSequence().entropy % (1 << 63))
        self.seed = seed
        self.rngs = [np.random.default_rng(seed + row) for row in range(batch)]
        self.step = 0                # calls so far: 0 is the prompt's logits

    def distribution(self, logits: np.ndarray, history: list[list[int]]) -> np.ndarray:
        """Processed logits [B, V] (a copy; the backend's buffer is left alone)."""
        processed = np.array(logits, dtype=np.float32, copy=True)
        for processor in self.chain:
            processed = processor(processed, history)
        return processed

    def __call__(self, logits: np.ndarray, history: list[list[int]]) -> np.ndarray:
        check_finite(logits, self.step)
        self.step += 1
        if self.cfg.is_greedy and not self.chain:
            # Nothing changes the logits: no copy, and logits still on a GPU give only their argmax.
            return argmax_rows(logits)
        processed = self.distribution(logits, history)
        if self.cfg.is_greedy:
            return np.argmax(processed, axis=-1)
        cdf = self.cdf(processed)
        return np.array([self.pick(cdf[row], rng) for row, rng in enumerate(self.rngs)], dtype=np.int64)

    @staticmethod
    def cdf(processed: np.ndarray) -> np.ndarray:
        """The cumulative distribution [B, V] of processed logits (float64)."""
        return np.cumsum(softmax(overflow_to_limit(processed).astype(np.float64)), axis=-1)

    @staticmethod
    def pick(cdf: np.ndarray, rng) -> int:
        """One draw by inverse CDF: one uniform number per token (speculative sampling of certain drafts
        draws the same way, so a seed gives the same tokens with and without them)."""
        draw = rng.random() * cdf[-1]
        return min(int(np.searchsorted(cdf, draw, side="right")), len(cdf) - 1)

