"""Speculative decoding, exact: draft k tokens cheaply, verify them in one step of the model, keep the
longest prefix the model agrees with and one token of the model's own.

    spec = Speculation("ngram")                                   # prompt lookup: no memory, no model
    spec = Speculation("draft", draft=Generator.load(SMALL))      # a smaller or quantized bundle
    result = gen.generate(prompt, SamplingConfig(greedy=True), speculation=spec)

At batch 1 each decode step reads all the weights to make one token; a verify step (decode.Rows.verify:
the last sampled token and k drafted ones, every position's logits) reads them once for up to k + 1.

Drafters:
- `NgramDrafter` (prompt lookup): find the most recent earlier occurrence of the last n tokens of prompt +
  output (n from `ngram` down to 1) and propose the tokens that followed it. Grounded work (edit this
  code, fix this text, fill this table) repeats long spans of its prompt.
- `DraftModel`: another bundle with the same vocabulary drafts greedily (or by sampling, for sampled
  generation), its own arena kept in step with the model's: only the tokens it has not seen run.

Acceptance, so the output is what plain decoding would give:
- greedy: a drafted token stays while it is the model's most likely token at its position; the first one
  that is not is replaced by that token. The tokens are plain greedy decoding's.
- sampling: the speculative sampling rule. A drafted token x that the drafter chose with probability q(x)
  stays with probability min(1, p(x) / q(x)), p being the model's distribution at its position after the
  sampling settings (temperature, top-k, top-p, min-p, repetition penalty); the first rejected one is
  replaced by a draw from max(0, p - q), renormalized; if all stay, one more token is drawn from p. Each
  output token is then distributed exactly as plain sampling's (an n-gram draft is certain: q(x) = 1).

`AdaptiveK` sizes the next draft from how often drafts are kept and what a verify step costs at each
width, measured as it goes, so a prompt where drafts fail costs little more than plain decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .backends.base import argmax_rows
from .errors import UserError
from .sampling import Sampler, softmax

METHODS = ("ngram", "draft")


@dataclass
class Speculation:
    method: str = "ngram"            # "ngram" (prompt lookup) or "draft" (a draft model)
    draft_tokens: int = 8            # the most tokens drafted per step (K)
    ngram: int = 3                   # n-gram lookup: the longest suffix matched (down to 1)
    adaptive: bool = True            # size K from recent acceptances, pause after repeated misses
    draft: object = None             # method "draft": a Generator of the draft bundle

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown speculation method {self.method!r} (ngram or draft)")
        if isinstance(self.draft_tokens, bool) or not isinstance(self.draft_tokens, int) or \
                not 1 <= self.draft_tokens <= 31:
            raise UserError(f"--draft-tokens must be a whole number in [1, 31] (got {self.draft_tokens!r})")
        if isinstance(self.ngram, bool) or not isinstance(self.ngram, int) or not 1 <= self.ngram <= 16:
            raise UserError(f"--ngram must be a whole number in [1, 16] (got {self.ngram!r})")
        if self.method == "draft" and self.draft is None:
            raise UserError("speculation by a draft model needs the draft bundle (--draft BUNDLE)")


@dataclass
class SpeculationStats:
    verify_steps: int = 0            # verify steps run (each: the model once, on 1 + drafted tokens)
    plain_steps: int = 0             # one-token steps where nothing was drafted
    drafted: int = 0
    accepted: int = 0
    draft_seconds: float = 0.0

    def to_json(self) -> dict:
        steps = self.verify_steps + self.plain_steps
        produced = self.accepted + steps            # every step also makes one token of the model's own
        return {"verify_steps": self.verify_steps, "plain_steps": self.plain_steps, "drafted": self.drafted,
                "accepted": self.accepted,
                "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else 0.0,
                "mean_accepted_per_verify": round(self.accepted / self.verify_steps, 3) if self.verify_steps else 0.0,
                "tokens_per_model_step": round(produced / steps, 3) if steps else 0.0,
                "draft_s": round(self.draft_seconds, 4)}


@dataclass
class Draft:
    tokens: list[int]
    q: np.ndarray | None = None      # [k, vocab] the drafter's probabilities (None: certain tokens)


class NgramDrafter:
    """Prompt lookup: the tokens that followed an earlier occurrence of the history's last n tokens
    (n = `ngram` down to 1): the most recent one that is followed by k tokens, else the earliest (the
    longest continuation; in a repeating stretch the most recent match is followed by one token only)."""

    def __init__(self, ngram: int = 3):
        self.ngram = ngram

    def prepare(self, prompt: list[int]) -> None:
        pass

    def propose(self, history: list[int], k: int) -> Draft:
        seq = np.asarray(history, dtype=np.int64)
        for n in range(min(self.ngram, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            # windows of n tokens that end before the last one: starts 0 .. len - n - 1
            windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
            hits = np.nonzero((windows == tail).all(axis=1))[0]
            if len(hits):
                follows = len(seq) - (hits + n)          # tokens after each match
                full = hits[follows >= k]
                start = int(full[-1] if len(full) else hits[0]) + n
                return Draft(seq[start:start + k].tolist())
        return Draft([])

    def close(self) -> None:
        pass


class DraftModel:
    """A draft bundle's Generator proposing tokens greedily (or by sampling with `cfg`); its arena holds
    the K/V of `self.tokens`, a prefix of what it was last asked about, and only the rest runs."""

    def __init__(self, draft):
        self.gen, self.tokens = draft, []
        self.sampler: Sampler | None = None

    def start(self, cfg, seed: int) -> None:
        """A new generation: sampling settings (greedy or not) and the draft's own random stream."""
        from .sampling import SamplingConfig
        self.sampler = Sampler(SamplingConfig(**{**cfg.__dict__, "seed": seed, "stop": []}), 1)
        self.tokens = []

    def prepare(self, prompt: list[int]) -> None:
        """Read the prompt into the draft's arena before the first token (its prefill belongs there)."""
        if len(prompt) < self.gen.arena.max_seq:
            self.gen.batch.start([list(prompt)], self.gen.bundle.pad_id)
            self.tokens = list(prompt)

    def propose(self, history: list[int], k: int) -> Draft:
        gen = self.gen
        k = min(k, gen.arena.max_seq - len(history) - 1)
        if k < 1:
            return Draft([])
        if self.tokens:
            logits = gen.batch.resume(history, self.tokens)
        else:
            logits = gen.batch.start([history], gen.bundle.pad_id)
        self.tokens = list(history)
        tokens, q = [], []
        for i in range(k):
            if self.sampler.cfg.is_greedy and not self.sampler.chain:
                token = int(argmax_rows(logits)[0])
            else:
                probs = softmax(self.sampler.distribution(logits, [self.tokens]).astype(np.float64))[0]
                token = draw(probs, self.sampler.rngs[0])
                q.append(probs)
            tokens.append(token)
            if i + 1 < k:
                logits = gen.batch.feed(np.array([[token]], np.int64))
                self.tokens.append(token)
        return Draft(tokens, np.stack(q) if q else None)

    def close(self) -> None:
        self.gen.close()


def check_same_vocabulary(draft, target_bundle, target_tokenizer) -> None:
    """A draft model must speak the model's tokens: same vocabulary size and the same tokenizer."""
    bad = draft.bundle.vocab_size != target_bundle.vocab_size
    if not bad and target_tokenizer is not None and draft.tokenizer is not None:
        bad = draft.tokenizer.get_vocab() != target_tokenizer.get_vocab()
    if bad:
        raise UserError(f"--draft {draft.bundle.path}: its vocabulary differs from {target_bundle.path}'s "
                        f"(a draft model must share the model's tokenizer)")


class AdaptiveK:
    """How many tokens to draft next, from what drafts have been worth here: the chance that a drafted token
    is kept (alpha, estimated from recent drafts) and what a step costs at each verify width (measured:
    on a GPU a step of 8 tokens costs about what one does, on a CPU several times more). It picks the k
    in [0, K] with the most expected tokens per second, (1 - alpha^(k+1)) / (1 - alpha) / cost(k + 1);
    k = 0 is a plain step. After a run of plain steps it tries a small draft again (a probe), since what the
    text repeats changes as it goes; a costly probe that did not pay doubles the run before the next one, so
    where a draft model's drafts never pay, probing costs a few steps per generation, not one in every
    PROBE_AFTER. adaptive=False always drafts K. timed=False sizes drafts from acceptance
    alone (one more after a fully kept draft, one more than was kept otherwise), so that sampling with a
    draft model, whose random draws depend on how much was drafted, stays reproducible for a seed."""

    PROBE_AFTER = 8                  # plain steps in a row before a draft is tried again ...
    PROBE_AFTER_MAX = 256            # ... doubled after each probe that did not pay, up to this
    PROBE = 2                        # the tokens a probe drafts
    COSTLY_PROBE = 1.5               # plain steps a probe may cost and still not count as costly
    MEMORY = 0.8                     # weight of the past in the running estimates

    def __init__(self, k_max: int, adaptive: bool = True, timed: bool = True):
        self.k_max, self.adaptive, self.timed = k_max, adaptive, timed
        self.k = k_max                            # untimed: the next draft's size
        self.kept, self.ended = 2.0, 1.0          # running counts: kept drafted tokens, drafts cut short
        self.cost: dict[int, float] = {}          # verify width -> seconds per step (width 1: a plain step)
        self.plain_run = 0
        self.probe_after = self.PROBE_AFTER
        self.probing = False                      # the pending draft is a probe

    @property
    def alpha(self) -> float:
        return self.kept / (self.kept + self.ended)

    def budget(self) -> int:
        if not self.adaptive:
            return self.k_max
        if not self.timed:
            return self.k
        if 1 not in self.cost:
            return 0                               # a plain step first: the cost every draft must beat
        if len(self.cost) == 1:
            return self._probe()                   # then a small draft: its cost says how wider ones will go
        best = max(range(self.k_max + 1), key=self.tokens_per_second)
        if best == 0 and self.plain_run >= self.probe_after:
            return self._probe()
        self.probing = False
        return best

    def _probe(self) -> int:
        self.probing = True
        return min(self.PROBE, self.k_max)

    def tokens_per_second(self, k: int) -> float:
        a = min(self.alpha, 0.999)
        return (1 - a ** (k + 1)) / (1 - a) / self._cost(k + 1)

    def _cost(self, width: int) -> float:
        """Measured; else on the line through the two nearest measured widths (extended past the widest);
        with one width measured, as that one (which leans to trying a draft: it gets measured once tried)."""
        if width in self.cost:
            return self.cost[width]
        known = sorted(self.cost)
        below = [w for w in known if w < width]
        above = [w for w in known if w > width]
        if below and above:
            lo, hi = below[-1], above[0]
        elif len(known) >= 2:
            lo, hi = (known[-2], known[-1]) if below else (known[0], known[1])
        else:
            return self.cost[known[0]]
        slope = (self.cost[hi] - self.cost[lo]) / (hi - lo)
        return max(self.cost[lo] + slope * (width - lo), 1e-9)

    def update(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        """A verify step of `drafted` tokens kept `accepted` of them and took `seconds`."""
        if not drafted:
            return
        self.k = min(self.k_max, self.k + 1) if accepted == drafted else max(1, accepted + 1)
        m = self.MEMORY
        self.kept = m * self.kept + accepted
        self.ended = m * self.ended + (accepted < drafted)
        self.plain_run = 0
        if seconds is not None:
            if self.probing and 1 in self.cost:
                # a probe that did not pay and cost much (a draft model's steps) doubles the wait for the next;
                # a cheap one (n-gram: only a wider step) may come back as often as it likes
                paid = (accepted + 1) / seconds >= 1 / self.cost[1]
                costly = seconds > self.COSTLY_PROBE * self.cost[1]
                self.probe_after = min(2 * self.probe_after, self.PROBE_AFTER_MAX) if not paid and costly \
                    else self.PROBE_AFTER
            self._measure(drafted + 1, seconds)
        self.probing = False

    def plain_step(self, seconds: float) -> None:
        self.plain_run += 1
        self._measure(1, seconds)

    def _measure(self, width: int, seconds: float) -> None:
        old = self.cost.get(width)
        self.cost[width] = seconds if old is None else self.MEMORY * old + (1 - self.MEMORY) * seconds


def draw(probs: np.ndarray, rng) -> int:
    """One draw from a probability vector by inverse CDF (one uniform number, as sampling.Sampler)."""
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(probs) - 1)


def accept_greedy(argmaxes: np.ndarray, drafted: list[int]) -> tuple[int, int]:
    """argmaxes [k + 1]: the model's choice after each verified token. Returns (drafted tokens kept,
    the model's own next token)."""
    kept = 0
    while kept < len(drafted) and int(argmaxes[kept]) == drafted[kept]:
        kept += 1
    return kept, int(argmaxes[kept])


def accept_certain(cdf: np.ndarray, drafted: list[int], rng) -> tuple[int, int]:
    """Sampling with certain drafts (n-gram): at each position draw the token as plain sampling does (one
    uniform number, inverse CDF in vocabulary order) and keep the draft while they agree. A draft x is then
    kept with probability p(x), the speculative sampling rule for a certain draft, and the tokens are
    exactly plain sampling's for the same seed, whatever was drafted."""
    for i, token in enumerate(drafted):
        drawn = Sampler.pick(cdf[i], rng)
        if drawn != token:
            return i, drawn
    return len(drafted), Sampler.pick(cdf[len(drafted)], rng)


def accept_sampled(p: np.ndarray, draft: Draft, rng) -> tuple[int, int]:
    """p [k + 1, vocab]: the model's distributions after each verified token (processed, normalized).
    Returns (drafted tokens kept, the next token drawn)."""
    for i, token in enumerate(draft.tokens):
        q_token = 1.0 if draft.q is None else float(draft.q[i, token])
        if rng.random() * q_token < p[i, token]:          # kept with probability min(1, p / q)
            continue
        residual = np.maximum(p[i] - (_point(token, p.shape[1]) if draft.q is None else draft.q[i]), 0.0)
        total = residual.sum()
        return i, draw(residual / total if total > 0 else p[i], rng)
    return len(draft.tokens), draw(p[len(draft.tokens)], rng)


def _point(token: int, vocab: int) -> np.ndarray:
    q = np.zeros(vocab)
    q[token] = 1.0
    return q


@dataclass
class Verifier:
    """Turns a verify step's logits into kept tokens, with the generation's sampling settings."""
    sampler: Sampler
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    def accept(self, logits, history: list[int], draft: Draft) -> tuple[int, int]:
        k = len(draft.tokens)
        greedy, chain = self.sampler.cfg.is_greedy, self.sampler.chain
        if greedy and not chain:
            kept, token = accept_greedy(argmax_rows(logits), draft.tokens)
        else:
            host = np.asarray(logits, np.float32)
            histories = [history + draft.tokens[:i] for i in range(k + 1)]
            processed = np.concatenate([self.sampler.distribution(host[i:i + 1], [histories[i]])
                                        for i in range(k + 1)])
            if greedy:
                kept, token = accept_greedy(np.argmax(processed, axis=-1), draft.tokens)
            elif draft.q is None:
                kept, token = accept_certain(Sampler.cdf(processed), draft.tokens, self.sampler.rngs[0])
            else:
                kept, token = accept_sampled(softmax(processed.astype(np.float64)), draft, self.sampler.rngs[0])
        self.stats.verify_steps += 1
        self.stats.drafted += k
        self.stats.accepted += kept
        return kept, token
