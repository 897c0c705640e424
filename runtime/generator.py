"""The generation loop: tokenize, prefill, then one decode step per token over a backend and the KV arena.

    gen = Generator.load("BUNDLE", backend="ort")
    for piece in gen.stream("Hello", SamplingConfig(max_new_tokens=64, top_p=0.9, seed=1)):
        print(piece, end="")
    results = gen.generate(["Hi", "A longer prompt"], SamplingConfig(greedy=True))

A batch of prompts is left-padded; the attention mask hides the padding and positions are counted
from each row's first real token, so every row gets the same tokens as when run alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .bundle import Bundle, BundleError
from .kv_arena import KVArena
from .sampling import LogitsProcessor, Sampler, SamplingConfig
from .text import Detokenizer, StopStrings, render_chat


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


def load_backend(bundle: Bundle, backend: str = "ort", **kw):
    if backend == "ort":
        from .backends.ort import OrtBackend
        return OrtBackend(bundle, **kw)
    if backend == "trt":
        from .backends.trt import TrtBackend
        return TrtBackend(bundle, **kw)
    raise BundleError(f"unknown backend {backend!r} (choose ort or trt)")


class Generator:
    def __init__(self, bundle: Bundle, backend, max_batch: int | None = None):
        self.bundle, self.backend = bundle, backend
        self.tokenizer = bundle.tokenizer()
        self.arena: KVArena = backend.new_arena(max_batch)
        self.cached: list[int] = []          # batch-1 tokens whose K/V are in the arena (chat)

    @classmethod
    def load(cls, path, backend: str = "ort", max_batch: int | None = None, **backend_kw) -> "Generator":
        bundle = Bundle.load(path)
        return cls(bundle, load_backend(bundle, backend, **backend_kw), max_batch)

    def feed_prompt(self, x: np.ndarray, mask: np.ndarray, arena: KVArena) -> np.ndarray:
        """Run the prompt's tokens; logits of its last position. A backend with `prefill_chunk` takes
        long prompts in pieces of that many tokens (each piece attends to the ones before it through
        the arena): ONNX Runtime keeps its largest activation buffers for good, and a 1536-token
        prompt in one piece would leave the process 40 % larger for the rest of its life."""
        chunk = getattr(self.backend, "prefill_chunk", None)
        S = x.shape[1]
        if not chunk or S <= chunk:
            return self.backend.step(x, mask, arena)
        past = mask.shape[1] - S
        for start in range(0, S, chunk):
            stop = min(S, start + chunk)
            logits = self.backend.step(x[:, start:stop], mask[:, :past + stop], arena)
        return logits

    # -- text ---------------------------------------------------------------------------------
    def _special(self, key: str) -> str:
        tid = self.bundle.manifest.get("special_tokens", {}).get(key)
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        return self.tokenizer.id_to_token(tid) if (tid is not None and self.tokenizer) else ""

    def chat_text(self, messages: list[dict]) -> str:
        template = self.bundle.manifest.get("chat_template")
        if not template:
            raise BundleError(f"{self.bundle.path}: the bundle has no chat template (drop --chat)")
        return render_chat(template, messages, self._special("bos_token_id"), self._special("eos_token_id"))

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
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
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.bundle.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.bundle.vocab_size})")
        return ids

    # -- public API ---------------------------------------------------------------------------
    def stream(self, prompt, cfg: SamplingConfig | None = None, chat: bool = False) -> Iterator[str]:
        """Text pieces of one prompt as they are produced."""
        for ev in self.events([self.to_ids(prompt, chat)], cfg or SamplingConfig()):
            if ev.text:
                yield ev.text

    def generate(self, prompts, cfg: SamplingConfig | None = None, chat: bool = False):
        """One prompt (str or id list) -> GenerationResult; a list of prompts -> list of results."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        batch = [prompts] if single else list(prompts)
        run = Run(self.events([self.to_ids(p, chat) for p in batch], cfg or SamplingConfig()))
        for _ in run:
            pass
        return run.results[0] if single else run.results

    # -- the loop -----------------------------------------------------------------------------
    def events(self, prompt_ids: list[list[int]], cfg: SamplingConfig, continue_cache: bool = False,
               processors: list[LogitsProcessor] | None = None):
        """Generator of Events; it returns the list of GenerationResults (iterate it through `Run`).

        continue_cache (batch 1): keep the arena's K/V for the longest common prefix with the
        previous call and run only the new tokens (through the decode graph when a past exists).
        """
        B = len(prompt_ids)
        if B == 0:
            raise ValueError("no prompts given")
        if B > self.arena.max_batch:
            raise ValueError(f"{B} prompts exceed the bundle's max_batch {self.arena.max_batch}")
        for ids in prompt_ids:
            if not ids:
                raise ValueError("empty prompt: give at least one token")
            if len(ids) >= self.bundle.max_seq:
                raise ValueError(f"prompt of {len(ids)} tokens does not fit max_seq {self.bundle.max_seq} "
                                 f"(re-export with a larger --max-seq)")
        arena, backend = self.arena, self.backend
        eos = set() if cfg.ignore_eos else set(cfg.eos_ids if cfg.eos_ids is not None else self.bundle.eos_ids)
        pad = self.bundle.pad_id

        t0 = time.perf_counter()
        run0 = backend.run_seconds()
        if continue_cache and B == 1 and self.cached and arena.batch == 1:
            ids = prompt_ids[0]
            keep = 0
            while keep < min(len(ids) - 1, len(self.cached)) and ids[keep] == self.cached[keep]:
                keep += 1
            arena.length = keep
            x = np.asarray([ids[keep:]], dtype=np.int64)
            mask = np.ones((1, len(ids)), dtype=np.int64)
        else:
            arena.reset(B)
            S = max(len(p) for p in prompt_ids)
            x = np.full((B, S), pad, dtype=np.int64)
            mask = np.zeros((B, S), dtype=np.int64)
            for r, p in enumerate(prompt_ids):
                x[r, S - len(p):] = p
                mask[r, S - len(p):] = 1
        fed_tokens = list(prompt_ids[0]) if B == 1 else []
        logits = self.feed_prompt(x, mask, arena)

        sampler = Sampler(cfg, B, processors)
        history = [list(p) for p in prompt_ids]
        generated: list[list[int]] = [[] for _ in range(B)]
        reasons: list[str | None] = [None] * B
        detok = [Detokenizer(self.tokenizer, p) if self.tokenizer else None for p in prompt_ids]
        stops = [StopStrings(cfg.stop) for _ in range(B)]
        texts = [""] * B
        t_first = None
        while True:
            tokens = sampler(logits, history)
            if t_first is None:
                t_first = time.perf_counter()
            for r in range(B):
                if reasons[r]:
                    continue
                tok = int(tokens[r])
                generated[r].append(tok)
                history[r].append(tok)
                piece = ""
                if tok in eos:
                    reasons[r] = "eos"
                elif detok[r] is not None:
                    piece, hit = stops[r].feed(detok[r].add(tok))
                    if hit:
                        reasons[r] = "stop_string"
                if reasons[r] is None and len(generated[r]) >= cfg.max_new_tokens:
                    reasons[r] = "max_new_tokens"
                if reasons[r] and reasons[r] != "stop_string" and detok[r] is not None:
                    piece += stops[r].flush()
                texts[r] += piece
                yield Event(r, tok, piece)
            if all(reasons):
                break
            if arena.length + 1 > arena.max_seq:
                for r in range(B):
                    reasons[r] = reasons[r] or "max_seq"
                break
            x = np.where([reason is None for reason in reasons], tokens, pad).astype(np.int64)[:, None]
            if B == 1:
                fed_tokens.append(int(tokens[0]))
            mask = np.concatenate([mask, np.ones((B, 1), dtype=np.int64)], axis=1)
            logits = backend.step(x, mask, arena)
        t_end = time.perf_counter()
        self.cached = fed_tokens if B == 1 else []

        results = []
        graph_s = backend.run_seconds() - run0
        for r in range(B):
            n = len(generated[r])
            decode_s = t_end - t_first
            results.append(GenerationResult(
                prompt_ids=list(prompt_ids[r]), token_ids=generated[r],
                text=texts[r] if self.tokenizer else None, stop_reason=reasons[r],
                ttft_s=t_first - t0, decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
                timings={"total_s": round(t_end - t0, 6), "graph_s": round(graph_s, 6)}))
        return results


class ChatSession:
    """A conversation that keeps its KV cache between turns: each turn runs only its new tokens."""

    def __init__(self, gen: Generator, system: str | None = None):
        self.gen = gen
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def turn(self, user: str, cfg: SamplingConfig) -> Iterator[str]:
        self.messages.append({"role": "user", "content": user})
        ids = self.gen.encode_messages(self.messages)
        run = Run(self.gen.events([ids], cfg, continue_cache=True))
        for ev in run:
            if ev.text:
                yield ev.text
        self.last = run.results[0]
        self.messages.append({"role": "assistant", "content": self.last.text})

