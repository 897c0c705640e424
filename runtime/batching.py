"""Continuous batching: requests join the running batch between decode steps and leave when done.

    scheduler = BatchingScheduler(Generator.load(B, max_batch=8), max_queue=64)
    handle = scheduler.submit(Request(prompt_ids, SamplingConfig(max_new_tokens=64, seed=1)))
    for event in handle.events():
        ...
    scheduler.close()

One thread owns the generator. Each turn of its loop: take queued requests into free arena rows (each
prompt runs into its row alone, decode.Slots.admit; the other rows keep their cache), then one decode
step for every row at once (decode.Slots.step), then every running request samples its own token with
its own settings, seed, stop strings and constraint, and those that are done leave: their row is free
for the next request. A cancelled request leaves at the next turn. The protocol a server sees is
runtime/scheduling.py's.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .backends.base import argmax_rows
from .decode import Slots
from .errors import UserError
from .generator import RowProgress, RunTimings
from .sampling import Sampler
from .scheduling import Handle, QueueFull, Request


@dataclass
class _Running:
    """A request in an arena row: its progress (tokens, text, stop), sampler and the token to feed next."""
    handle: Handle
    row: int
    progress: RowProgress
    sampler: Sampler
    eos: set
    started: float
    first_token_at: float = 0.0
    token: int = -1
    plain_greedy: bool = field(init=False)

    def __post_init__(self):
        self.plain_greedy = self.sampler.cfg.is_greedy and not self.sampler.chain


def constraint_processor(constraint):
    """A logits processor that leaves only the tokens the constraint allows next."""
    def apply(logits, history):
        allowed = np.asarray(constraint.allowed(), dtype=bool)
        logits[:, :len(allowed)][:, ~allowed] = -np.inf
        logits[:, len(allowed):] = -np.inf
        return logits
    return apply


class BatchingScheduler:
    def __init__(self, generator, max_queue: int = 64):
        self.gen = generator
        self.max_batch = generator.arena.max_batch
        if generator.backend.device == "cuda":       # record each batch size's step before the first request
            generator.warmup(batch_sizes=range(1, self.max_batch + 1))
        self.slots = Slots(generator.backend, generator.arena, generator.bundle.pad_id)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._running: dict[int, _Running] = {}
        self._closing, self._drain = False, True
        self.counters = {"admitted": 0, "finished": 0, "cancelled": 0, "failed": 0, "steps": 0, "row_steps": 0,
                         "tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="ardeploy-batching", daemon=True)
        self._thread.start()

    # -- the protocol (runtime/scheduling.py) -------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        if self._closing:
            raise QueueFull("the scheduler is shutting down")
        self._check(request)
        handle = Handle(request)
        handle.submitted_at = time.perf_counter()
        try:
            self._queue.put_nowait(handle)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are waiting already") from None
        return handle

    def stats(self) -> dict:
        return {"queued": self._queue.qsize(), "running": len(self._running), "max_batch": self.max_batch,
                **self.counters}

    def close(self, drain: bool = True) -> None:
        self._drain, self._closing = drain, True
        self._thread.join()

    # -- the loop -------------------------------------------------------------------------------------------
    def _check(self, request: Request) -> None:
        ids, bundle, max_seq = request.prompt_ids, self.gen.bundle, self.gen.arena.max_seq
        if not ids:
            raise UserError("empty prompt: give at least one token")
        if len(ids) >= max_seq:
            raise UserError(f"prompt of {len(ids)} tokens does not fit max_seq {max_seq}")
        bad = [t for t in ids if not 0 <= int(t) < bundle.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {bundle.vocab_size})")

    def _loop(self) -> None:
        while True:
            if self._closing and not self._drain:
                self._cancel_everything()
            self._admit_waiting()
            self._drop_cancelled()
            if self._running:
                self._step()
            elif self._closing and self._queue.empty():
                return
            else:
                self._wait_for_work()

    def _wait_for_work(self) -> None:
        try:
            handle = self._queue.get(timeout=0.05)
        except queue.Empty:
            return
        self._admit(handle)

    def _admit_waiting(self) -> None:
        while self.slots.free and not self._queue.empty():
            self._admit(self._queue.get_nowait())

    def _admit(self, handle: Handle) -> None:
        """Prefill the request into a free row and sample its first token."""
        if handle.cancelled:
            self._cancel_waiting(handle)
            return
        request, gen = handle.request, self.gen
        processors = [constraint_processor(request.constraint)] if request.constraint is not None else None
        try:
            row, logits = self.slots.admit(list(request.prompt_ids))
        except Exception as error:                      # noqa: BLE001 - the request fails, the loop goes on
            handle._finish(error=error)
            self.counters["failed"] += 1
            return
        eos = set() if request.sampling.ignore_eos else set(
            request.sampling.eos_ids if request.sampling.eos_ids is not None else gen.bundle.eos_ids)
        running = _Running(handle, row, RowProgress(request.prompt_ids, gen.tokenizer, request.sampling.stop),
                           Sampler(request.sampling, 1, processors), eos, getattr(handle, "submitted_at", 0.0))
        self._running[row] = running
        self.counters["admitted"] += 1
        self._take(running, self._sample(running, logits, 0))

    def _step(self) -> None:
        tokens = np.full(self.max_batch, self.gen.bundle.pad_id, np.int64)
        for row, running in self._running.items():
            tokens[row] = running.token
        try:
            logits = self.slots.step(tokens)
        except Exception as error:                      # noqa: BLE001 - the rows in flight fail, the loop goes on
            for running in list(self._running.values()):
                self._release(running)
                running.handle._finish(error=error)
                self.counters["failed"] += 1
            return
        self.counters["steps"] += 1
        self.counters["row_steps"] += len(self._running)
        greedy = argmax_rows(logits) if any(r.plain_greedy for r in self._running.values()) else None
        for row, running in list(self._running.items()):
            token = int(greedy[row]) if running.plain_greedy else self._sample(running, logits, row)
            self._take(running, token)

    def _sample(self, running: _Running, logits, row: int) -> int:
        if running.plain_greedy:
            return int(argmax_rows(logits)[row])
        values = np.asarray(logits, np.float32)[row:row + 1]
        return int(running.sampler(values, [running.progress.history])[0])

    def _take(self, running: _Running, token: int) -> None:
        """The row's next token: emit its text; the row leaves when it is done."""
        progress, request = running.progress, running.handle.request
        running.first_token_at = running.first_token_at or time.perf_counter()
        running.handle._emit(token, progress.add(token, running.eos, request.sampling.max_new_tokens))
        self.counters["tokens"] += 1
        if request.constraint is not None and progress.stop_reason is None:
            request.constraint.advance(token)
            if request.constraint.is_finished():
                progress.stop_reason = "constraint"
        if progress.stop_reason is None and self.slots.lengths[running.row] + 1 > self.gen.arena.max_seq:
            progress.stop_reason = "max_seq"
        running.token = token
        if progress.stop_reason is not None:
            self._finish(running)

    def _finish(self, running: _Running, why: str = "finished") -> None:
        self._release(running)
        timings = RunTimings(running.started, running.first_token_at, time.perf_counter(), 0.0)
        running.handle._finish(result=running.progress.result(timings, has_text=self.gen.tokenizer is not None))
        self.counters[why] += 1

    def _release(self, running: _Running) -> None:
        self._running.pop(running.row, None)
        self.slots.release(running.row)

    def _drop_cancelled(self) -> None:
        for running in [r for r in self._running.values() if r.handle.cancelled]:
            running.progress.stop_reason = "cancelled"
            self._finish(running, "cancelled")

    def _cancel_everything(self) -> None:
        for running in self._running.values():
            running.handle.cancel()
        while not self._queue.empty():
            self._cancel_waiting(self._queue.get_nowait())

    def _cancel_waiting(self, handle: Handle) -> None:
        """A request cancelled before it had a row: a result with no tokens, stop_reason "cancelled"."""
        progress = RowProgress(handle.request.prompt_ids, None, [])
        progress.stop_reason = "cancelled"
        now = time.perf_counter()
        handle._finish(result=progress.result(RunTimings(getattr(handle, "submitted_at", now), now, now, 0.0),
                                              has_text=False))
        self.counters["cancelled"] += 1
