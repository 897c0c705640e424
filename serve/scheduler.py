"""SequentialScheduler: the simplest engine behind the server, one request at a time on a background thread.

It keeps the protocol of `ardeploy.runtime.scheduling` (submit -> Handle, stats, close), so a scheduler
that batches rows (requests joining a running batch between decode steps) can take its place without a
change above it. Each request runs through `Generator.events` with its own SamplingConfig; its Constraint,
if any, becomes a logits mask applied before sampling at every step (the `processors` hook), and a
cancelled request stops at its next step.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from ardeploy.runtime.errors import UserError
from ardeploy.runtime.generator import GenerationResult, Generator
from ardeploy.runtime.log import log
from ardeploy.runtime.scheduling import Handle, QueueFull, Request

NEG_INF = -np.inf


def constraint_processor(constraint):
    """A logits processor that removes every token the constraint does not allow (batch of one row)."""
    def apply(logits, history):
        allowed = np.asarray(constraint.allowed(), dtype=bool)
        vocab = logits.shape[-1]
        if allowed.shape[0] < vocab:                 # ids past the tokenizer's: never allowed
            allowed = np.concatenate([allowed, np.zeros(vocab - allowed.shape[0], dtype=bool)])
        logits[:, ~allowed[:vocab]] = NEG_INF
        return logits
    return apply


def check_request(generator: Generator, request: Request) -> None:
    """What a scheduler refuses at submit time (a UserError naming the problem)."""
    ids, limit = request.prompt_ids, generator.arena.max_seq
    if not ids:
        raise UserError("empty prompt: give at least one token")
    if len(ids) >= limit:
        raise UserError(f"prompt of {len(ids)} tokens does not fit the model's context of {limit} tokens")
    vocab = generator.bundle.vocab_size
    bad = [token for token in ids if not 0 <= int(token) < vocab]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    request.sampling.validate()


class SequentialScheduler:
    """Runs submitted requests one after another (`max_batch` is 1) on its own thread.

    max_queue: requests waiting beyond the running one; one more raises QueueFull."""

    max_batch = 1

    def __init__(self, generator: Generator, max_queue: int = 64):
        if max_queue < 1:
            raise UserError(f"max_queue must be at least 1 (got {max_queue})")
        self.generator = generator
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lock = threading.Lock()
        self._closing = False
        self._running: Handle | None = None
        self._counts = {"steps": 0, "finished": 0, "cancelled": 0, "failed": 0, "tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="ardeploy-scheduler", daemon=True)
        self._thread.start()

    # -- the protocol ---------------------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        check_request(self.generator, request)
        handle = Handle(request)
        with self._lock:
            if self._closing:
                raise QueueFull("the scheduler is shutting down")
            try:
                self._queue.put_nowait(handle)
            except queue.Full:
                raise QueueFull(f"{self._queue.maxsize} requests already wait") from None
        return handle

    def stats(self) -> dict:
        with self._lock:
            running = 1 if self._running is not None else 0
            return {"queued": self._queue.qsize(), "running": running, "max_batch": self.max_batch,
                    "max_queue": self._queue.maxsize, **self._counts}

    def close(self, drain: bool = True) -> None:
        with self._lock:
            self._closing = True
            if not drain:
                self._cancel_all()
        self._queue.put(None)                        # wakes the thread; it leaves after the queue empties
        self._thread.join()

    # -- the thread -----------------------------------------------------------------------------
    def _cancel_all(self) -> None:
        if self._running is not None:
            self._running.cancel()
        for handle in list(self._queue.queue):
            if handle is not None:
                handle.cancel()

    def _loop(self) -> None:
        while True:
            handle = self._queue.get()
            if handle is None:
                if self._queue.empty():
                    return
                self._queue.put(None)                # requests arrived behind the sentinel: run them first
                continue
            with self._lock:
                self._running = handle
            try:
                result = self._run(handle)
            except Exception as e:                   # noqa: BLE001 - the request fails, the server goes on
                log.warning(f"request {handle.request.id} failed: {type(e).__name__}: {e}")
                self._count("failed")
                handle._finish(error=e)
            else:
                self._count("cancelled" if result.stop_reason == "cancelled" else "finished")
                handle._finish(result)
            finally:
                with self._lock:
                    self._running = None

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _run(self, handle: Handle) -> GenerationResult:
        request, started = handle.request, time.perf_counter()
        if handle.cancelled:
            return _result(request, [], "", "cancelled", started, None)
        constraint = request.constraint
        processors = [constraint_processor(constraint)] if constraint is not None else None
        events = self.generator.events([list(request.prompt_ids)], request.sampling, processors=processors)
        tokens, text, first_at, reason = [], "", None, None
        try:
            while True:
                try:
                    event = next(events)
                except StopIteration as done:          # the generator's own stop (EOS, budget, stop string)
                    return done.value[0]
                first_at = first_at or time.perf_counter()
                self._count("steps")
                self._count("tokens")
                tokens.append(event.token)
                text += event.text
                if constraint is not None:
                    constraint.advance(event.token)
                handle._emit(event.token, event.text)
                if handle.cancelled:
                    reason = "cancelled"
                elif constraint is not None and constraint.is_finished():
                    reason = "constraint"
                if reason:
                    return _result(request, tokens, text, reason, started, first_at)
        finally:
            events.close()


def _result(request: Request, tokens: list[int], text: str, reason: str, started: float,
            first_at: float | None) -> GenerationResult:
    now = time.perf_counter()
    first = first_at if first_at is not None else now
    rate = (len(tokens) - 1) / (now - first) if len(tokens) > 1 and now > first else 0.0
    return GenerationResult(prompt_ids=list(request.prompt_ids), token_ids=tokens, text=text, stop_reason=reason,
                            ttft_s=first - started, decode_tokens_per_s=rate,
                            timings={"total_s": round(now - started, 6)})
