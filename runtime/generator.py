"""The generation loop: tokenize, prefill, then one decode step per token over a backend and the KV arena.

    gen = Generator.load("BUNDLE", backend="ort")
    for piece in gen.stream("Hello", SamplingConfig(max_new_tokens=64, top_p=0.9, seed=1)):
        print(piece, end="")
    results = gen.generate(["Hi", "A longer prompt"], SamplingConfig(greedy=True))

A batch of prompts is left-padded; the attention mask hides the padding and positions are counted
from each row's first real token, so every row gets the same tokens as when run alone.

`Generator.events` is the loop, in phases: the prompts go in (`Rows.start`, or `Rows.resume` for a chat
turn's new tokens after the part of the conversation still in the arena), then repeatedly sample, let
every running row take its token (`RowProgress.add`: stop on EOS, a stop string or the token budget) and
`_decode_step` (one new position per row, `Rows.feed`) until every row has stopped or the cache is full.
The model runs only through the decode primitive, runtime/decode.py.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .bundle import Bundle, BundleError
from .decode import Rows
from .kv_arena import KVArena
from .manifest_checks import check_kv_memory
from .backends import load_backend
from .run_options import RunOptions
from .sampling import LogitsProcessor, Sampler, SamplingConfig
from .speculative import AdaptiveK, Draft, DraftModel, NgramDrafter, Speculation, Verifier, check_same_vocabulary
from .text import Detokenizer, StopStrings, check_text, render_chat
from .errors import UserError
from .log import log


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    stop_reason: str             # eos | stop_string | max_new_tokens | max_seq
    ttft_s: float                # prompt in -> first token out
    decode_tokens_per_s: float   # tokens after the first / time after the first
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "text": self.text,
                "stop_reason": self.stop_reason, "ttft_s": round(self.ttft_s, 6),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 3), **self.timings}


@dataclass
class Event:
    """One sampled token of one row; `text` is the printable piece it completed ("" if none yet)."""
    row: int
    token: int
    text: str


class Run:
    """Iterates the Events of one generation; `results` holds the GenerationResults once it ends."""

    def __init__(self, events):
        self._events, self.results = events, None

    def __iter__(self):
        self.results = yield from self._events


MIN_BUDGETED_SEQ = 16            # a KV budget must hold at least this many positions


def cache_length(bundle: Bundle, kv_budget, max_batch: int | None) -> int | None:
    """The cache length a KV budget allows (None: no budget, the bundle's max_seq)."""
    if kv_budget is None:
        return None
    from .memory_plan import fit_kv, parse_bytes
    budget = parse_bytes(kv_budget) if isinstance(kv_budget, str) else int(kv_budget)
    return fit_kv(bundle, budget, max_batch or bundle.max_batch, min_seq=MIN_BUDGETED_SEQ)


class Generator:
    """Load, use, close: `with Generator.load(B) as gen: ...` frees its sessions, device buffers and
    captured graphs at the end (or call `close()`)."""

    def __init__(self, bundle: Bundle, backend, max_batch: int | None = None, max_seq: int | None = None):
        self._drafts_met = weakref.WeakSet()     # draft Generators already checked against this one
        self.bundle, self.backend = bundle, backend
        self.tokenizer = bundle.tokenizer()
        self.arena: KVArena = backend.new_arena(max_batch, max_seq)
        self.batch = Rows(backend, self.arena)      # the decode primitive (runtime/decode.py)
        self.cached: list[int] = []          # batch-1 tokens whose K/V are in the arena (chat)
        self.load_s = self.warmup_s = 0.0

    @classmethod
    def load(cls, path, options: RunOptions | None = None, max_batch: int | None = None,
             warmup: bool | None = None, kv_budget: int | str | None = None, **changes) -> "Generator":
        """options: how to run it (runtime/run_options.py); keywords override single fields, e.g.
        `Generator.load(B, device="cuda")`. warmup: run `warmup()` for batch 1 before returning (None: on
        the GPU, where the first runs record CUDA graphs and cost hundreds of milliseconds). kv_budget
        (bytes, or "512MiB"): the cache gets the longest max_seq that fits it at max_batch rows
        (runtime/memory_plan.fit_kv); a budget too small for a short prompt is refused in one line."""
        started = time.perf_counter()
        options = (options or RunOptions()).replace(**changes)
        bundle = Bundle.load(path)
        max_seq = cache_length(bundle, kv_budget, max_batch)
        if options.backend == "ort" and options.where == "cpu" and max_seq is None:   # before a host cache exists
            check_kv_memory(bundle.manifest, bundle.path, max_batch)
        gen = cls(bundle, load_backend(bundle, options), max_batch, max_seq)
        gen.load_s = time.perf_counter() - started
        if warmup or (warmup is None and gen.backend.device == "cuda"):
            gen.warmup()
        return gen

    def warmup(self, batch_sizes=(1,), prompt_lengths=(8,), verify_widths=()) -> float:
        """Run prompts of each length and two decode steps at each batch size, so that one-time costs
        (ONNX Runtime's first runs, recording each batch size's CUDA graph and checking its first replay)
        are paid here and not by the first request's first token. On the GPU a prompt length ONNX Runtime
        has not seen costs about 40 ms once (its first GroupQueryAttention of that length, H100): give the
        lengths to come when they are known. verify_widths (speculation, batch 1): the verify steps of
        those widths too (each a new length and a captured graph; unwarmed, they made n-gram speculation
        on SmolLM2 slower than plain decoding on an H100). The arena is left empty. Returns the seconds."""
        started = time.perf_counter()
        pad = self.bundle.pad_id
        for batch in batch_sizes:
            if not 1 <= batch <= self.arena.max_batch:
                raise UserError(f"warm-up batch {batch} outside [1, {self.arena.max_batch}]")
            for length in prompt_lengths:
                length = max(1, min(int(length), self.arena.max_seq - 3))
                self.batch.start([[pad] * length] * batch, pad)
            for _ in range(2):
                self.batch.feed(np.full((batch, 1), pad, np.int64))
        self._warm_verify_widths(verify_widths, pad)
        self.arena.reset(1)
        self.cached = []
        self.warmup_s += time.perf_counter() - started
        return time.perf_counter() - started

    def _warm_verify_widths(self, widths, pad: int) -> None:
        widths = [w for w in widths if w > 1]
        if not widths:
            return
        self.batch.start([[pad] * 8], pad)
        for width in widths:
            if self.arena.length + width > self.arena.max_seq:
                break
            self.batch.verify([pad] * width)
            self.batch.rollback(width)

    def close(self) -> None:
        """Free the backend's sessions, captured graphs and device buffers, and the arena. Idempotent."""
        if self.backend is not None:
            self.backend.close()
        self.backend, self.arena, self.batch, self.cached = None, None, None, []

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- text ---------------------------------------------------------------------------------
    def _special(self, key: str) -> str:
        token_id = self.bundle.manifest.get("special_tokens", {}).get(key)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        return self.tokenizer.id_to_token(token_id) if (token_id is not None and self.tokenizer) else ""

    def chat_text(self, messages: list[dict]) -> str:
        template = self.bundle.manifest.get("chat_template")
        if not template:
            raise BundleError(f"{self.bundle.path}: the bundle has no chat template (drop --chat)")
        return render_chat(template, messages, self._special("bos_token_id"), self._special("eos_token_id"),
                           where=f"{self.bundle.path}: the chat template (manifest.json chat_template)")

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        check_text(prompt, "the prompt")
        if chat:
            return self.encode_messages([{"role": "user", "content": prompt}])
        self._need_tokenizer()
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def encode_messages(self, messages: list[dict]) -> list[int]:
        # The chat template writes its own special tokens, so the tokenizer adds none.
        self._need_tokenizer()
        return self.tokenizer.encode(self.chat_text(messages), add_special_tokens=False).ids

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise BundleError(f"{self.bundle.path}: the bundle has no tokenizer; pass token ids (--prompt-ids)")

    def decode(self, ids: list[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def to_ids(self, prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt, chat)
        ids = [int(token) for token in prompt]
        bad = [token for token in ids if not 0 <= token < self.bundle.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {self.bundle.vocab_size})")
        return ids

    # -- public API ---------------------------------------------------------------------------
    def stream(self, prompt, cfg: SamplingConfig | None = None, chat: bool = False,
               speculation: Speculation | None = None) -> Iterator[str]:
        """Text pieces of one prompt as they are produced."""
        for event in self.events([self.to_ids(prompt, chat)], cfg or SamplingConfig(), speculation=speculation):
            if event.text:
                yield event.text

    def generate(self, prompts, cfg: SamplingConfig | None = None, chat: bool = False,
                 speculation: Speculation | None = None):
        """One prompt (str or id list) -> GenerationResult; a list of prompts -> list of results.
        speculation (one prompt): runtime/speculative.py."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        batch = [prompts] if single else list(prompts)
        run = Run(self.events([self.to_ids(one, chat) for one in batch], cfg or SamplingConfig(),
                              speculation=speculation))
        for _ in run:
            pass
        return run.results[0] if single else run.results

    # -- the loop: prefill, then sample / decode one step until every row has stopped ------------
    def events(self, prompt_ids: list[list[int]], cfg: SamplingConfig, continue_cache: bool = False,
               processors: list[LogitsProcessor] | None = None, speculation: Speculation | None = None):
        """Generator of Events; it returns the list of GenerationResults (iterate it through `Run`).

        continue_cache (batch 1): keep the arena's K/V for the longest common prefix with the
        previous call and run only the new tokens (through the decode graph when a past exists).
        speculation (batch 1): draft tokens and verify them several at a time (runtime/speculative.py);
        the tokens are plain decoding's (greedy) or distributed as plain sampling's.
        """
        if self.backend is None:
            raise UserError("this generator was closed")
        self._check_prompts(prompt_ids)
        if speculation is not None and len(prompt_ids) != 1:
            raise UserError("speculative decoding runs one prompt at a time")
        started, graph_before = time.perf_counter(), self.backend.run_seconds()
        reuse = continue_cache and len(prompt_ids) == 1 and self.cached and self.arena.batch == 1
        # `cached` names exactly the tokens whose K/V the arena holds: emptied before the arena is
        # touched, then grown only after a step has written them (a run abandoned half way, or one
        # that raised, leaves it true).
        cached, self.cached = self.cached, []
        logits = self.batch.resume(prompt_ids[0], cached) if reuse else \
            self.batch.start(prompt_ids, self.bundle.pad_id)
        if len(prompt_ids) == 1:
            self.cached = list(prompt_ids[0])
        rows = [RowProgress(ids, self.tokenizer, cfg.stop) for ids in prompt_ids]
        sampler = Sampler(cfg, len(rows), processors)
        eos = self._eos_ids(cfg)
        extra = {}
        if speculation is None:
            first_token_at = yield from self._plain_loop(logits, rows, sampler, eos, cfg)
        else:
            verifier = Verifier(sampler)
            first_token_at = yield from self._speculative_loop(logits, rows[0], sampler, eos, cfg, speculation,
                                                               verifier)
            extra["speculation"] = verifier.stats.to_json()
        finished = time.perf_counter()
        timings = RunTimings(started, first_token_at, finished, self.backend.run_seconds() - graph_before, extra)
        return [row.result(timings, has_text=self.tokenizer is not None) for row in rows]

    def _plain_loop(self, logits, rows: list["RowProgress"], sampler: Sampler, eos: set[int], cfg: SamplingConfig):
        """Sample, let every running row take its token, one decode step; until all have stopped.
        Returns when the first tokens were sampled."""
        first_token_at = None
        while True:
            tokens = sampler(logits, [row.history for row in rows])
            first_token_at = first_token_at or time.perf_counter()
            yield from take_tokens(rows, tokens, eos, cfg.max_new_tokens)
            if self._all_stopped(rows):
                return first_token_at
            logits = self._decode_step(tokens, rows)

    def _speculative_loop(self, logits, row: "RowProgress", sampler: Sampler, eos: set[int], cfg: SamplingConfig,
                          speculation: Speculation, verifier: Verifier):
        """One row: sample a token, draft up to K more after it, verify all in one step, keep what the
        model agrees with (the cache rolled back over the rest) and the model's own next token."""
        drafter = self._drafter(speculation, sampler)
        # sampling with a draft model draws as many random numbers as were drafted: size drafts without timing
        timed = speculation.method == "ngram" or sampler.cfg.is_greedy
        k = AdaptiveK(speculation.draft_tokens, speculation.adaptive, timed)
        drafter.prepare(row.history)          # a draft model reads the prompt now: part of the first token's time
        token = int(sampler(logits, [row.history])[0])
        first_token_at = time.perf_counter()
        yield from take_tokens([row], [token], eos, cfg.max_new_tokens)
        while not self._all_stopped([row]):
            room = min(cfg.max_new_tokens - len(row.token_ids) - 1, self.arena.max_seq - self.arena.length - 1)
            budget = min(k.budget(), room)
            drafted_at = time.perf_counter()       # a round's cost, drafting included, sizes the next draft
            draft = drafter.propose(row.history, budget) if budget > 0 else Draft([])
            verifier.stats.draft_seconds += time.perf_counter() - drafted_at
            if not draft.tokens:
                logits = self._decode_step(np.array([token]), [row])
                verifier.stats.plain_steps += 1
                token = int(sampler(logits, [row.history])[0])
                k.plain_step(time.perf_counter() - drafted_at)
                yield from take_tokens([row], [token], eos, cfg.max_new_tokens)
                continue
            fed = [token] + draft.tokens
            logits = self.batch.verify(fed)
            kept, token = verifier.accept(logits, row.history, draft)
            self.batch.rollback(len(draft.tokens) - kept)
            self.cached += fed[:1 + kept]
            k.update(len(draft.tokens), kept, time.perf_counter() - drafted_at)
            for accepted in draft.tokens[:kept] + [token]:
                yield from take_tokens([row], [accepted], eos, cfg.max_new_tokens)
                if row.stop_reason:
                    break
        return first_token_at

    def _drafter(self, speculation: Speculation, sampler: Sampler):
        if speculation.method == "ngram":
            return NgramDrafter(speculation.ngram)
        if speculation.draft not in self._drafts_met:     # once per draft: comparing vocabularies takes ~40 ms
            check_same_vocabulary(speculation.draft, self.bundle, self.tokenizer)
            if self.backend.own_threads or speculation.draft.backend.own_threads:
                log.warning("note: the model and its draft take turns on the CPU; load both with shared_threads=True "
                            "(RunOptions) or each one's idle threads slow the other down")
            self._drafts_met.add(speculation.draft)
        drafter = DraftModel(speculation.draft)
        drafter.start(sampler.cfg, (sampler.seed + 7919) % (1 << 63))    # its own random stream, fixed by the seed
        return drafter

    def _check_prompts(self, prompt_ids: list[list[int]]) -> None:
        if not prompt_ids:
            raise UserError("no prompts given")
        if len(prompt_ids) > self.arena.max_batch:
            raise UserError(f"{len(prompt_ids)} prompts exceed the bundle's max_batch {self.arena.max_batch}")
        for ids in prompt_ids:
            if not ids:
                raise UserError("empty prompt: give at least one token")
            if len(ids) >= self.arena.max_seq:
                raise UserError(f"prompt of {len(ids)} tokens does not fit max_seq {self.arena.max_seq} "
                                f"(re-export with a larger --max-seq"
                                f"{' or give a larger --kv-budget' if self.arena.max_seq < self.bundle.max_seq else ''})")

    def _eos_ids(self, cfg: SamplingConfig) -> set[int]:
        if cfg.ignore_eos:
            return set()
        return set(cfg.eos_ids if cfg.eos_ids is not None else self.bundle.eos_ids)

    def _all_stopped(self, rows: list["RowProgress"]) -> bool:
        """No row needs another step: all have stopped, or the cache is full (the rest stop with max_seq)."""
        if all(row.stop_reason for row in rows):
            return True
        if self.arena.length + 1 > self.arena.max_seq:
            for row in rows:
                row.stop_reason = row.stop_reason or "max_seq"
            return True
        return False

    def _decode_step(self, tokens: np.ndarray, rows: list["RowProgress"]):
        """One new position for every row: its sampled token (a stopped row: padding). Returns the logits."""
        running = [row.stop_reason is None for row in rows]
        ids = np.where(running, tokens, self.bundle.pad_id).astype(np.int64)[:, None]
        logits = self.batch.feed(ids)
        if len(rows) == 1:
            self.cached.append(int(ids[0, 0]))
        return logits


# -- per-row stop tracking ------------------------------------------------------------------------
@dataclass
class RunTimings:
    started: float                # prompts in
    first_token_at: float         # the first tokens sampled
    finished: float
    graph_s: float                # inside the backend's graph runs
    extra: dict = field(default_factory=dict)      # e.g. speculation statistics

    def of(self, n_tokens: int) -> dict:
        decode_s = self.finished - self.first_token_at
        rate = (n_tokens - 1) / decode_s if n_tokens > 1 and decode_s > 0 else 0.0
        return {"ttft_s": self.first_token_at - self.started, "decode_tokens_per_s": rate,
                "timings": {"total_s": round(self.finished - self.started, 6), "graph_s": round(self.graph_s, 6),
                            **self.extra}}


class RowProgress:
    """One row of a generation: its prompt, the tokens sampled for it, and why it stopped (None while
    it runs). With a tokenizer it also turns tokens into printable text and watches for stop strings."""

    def __init__(self, prompt_ids: list[int], tokenizer, stop_strings: list[str]):
        self.prompt_ids = list(prompt_ids)
        self.history = list(prompt_ids)             # what the sampler's processors see
        self.token_ids: list[int] = []
        self.text = ""
        self.stop_reason: str | None = None
        self.detokenizer = Detokenizer(tokenizer, prompt_ids) if tokenizer else None
        self.stops = StopStrings(stop_strings)

    def add(self, token: int, eos: set[int], max_new_tokens: int) -> str:
        """Take one sampled token; returns the printable text it completed ("" if none yet)."""
        self.token_ids.append(token)
        self.history.append(token)
        piece = ""
        if token in eos:
            self.stop_reason = "eos"
        elif self.detokenizer is not None:
            piece, hit = self.stops.feed(self.detokenizer.add(token))
            if hit:
                self.stop_reason = "stop_string"
        if self.stop_reason is None and len(self.token_ids) >= max_new_tokens:
            self.stop_reason = "max_new_tokens"
        if self.stop_reason not in (None, "stop_string") and self.detokenizer is not None:
            piece += self.stops.flush()           # text held back as a possible stop string's start
        self.text += piece
        return piece

    def result(self, timings: RunTimings, has_text: bool) -> GenerationResult:
        return GenerationResult(prompt_ids=self.prompt_ids, token_ids=self.token_ids,
                                text=self.text if has_text else None, stop_reason=self.stop_reason,
                                **timings.of(len(self.token_ids)))


def take_tokens(rows: list[RowProgress], tokens: np.ndarray, eos: set[int], max_new_tokens: int):
    """Events of one sampling step: each running row takes its token (stopped rows are skipped)."""
    for index, row in enumerate(rows):
        if row.stop_reason is None:
            token = int(tokens[index])
            yield Event(index, token, row.add(token, eos, max_new_tokens))


class ChatSession:
    """A conversation that keeps its KV cache between turns: each turn runs only its new tokens."""

    def __init__(self, gen: Generator, system: str | None = None):
        self.gen = gen
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def turn(self, user: str, cfg: SamplingConfig, speculation: Speculation | None = None) -> Iterator[str]:
        self.messages.append({"role": "user", "content": user})
        ids = self.gen.encode_messages(self.messages)
        run = Run(self.gen.events([ids], cfg, continue_cache=True, speculation=speculation))
        for event in run:
            if event.text:
                yield event.text
        self.last = run.results[0]
        self.messages.append({"role": "assistant", "content": self.last.text})

