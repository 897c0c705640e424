"""What a server asks of a generation engine: requests in, token events out, from any thread.

    scheduler = SomeScheduler(generator, max_queue=64)
    handle = scheduler.submit(Request(prompt_ids, SamplingConfig(max_new_tokens=64, seed=1)))
    for event in handle.events():          # blocks until the next token; ends when the request is done
        print(event.text, end="")
    handle.result                          # the GenerationResult (stop_reason "cancelled" after cancel())

A scheduler owns one generator and the thread that runs it; `submit` and `Handle` are safe to use from
other threads (an ASGI server's event loop takes the events through `Handle.listen`). Each request
keeps its own sampling settings, seed, stop strings and (optional) constraint: a structured-output
grammar that says which tokens may come next.
"""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from .sampling import SamplingConfig

_ids = itertools.count(1)


class Constraint(Protocol):
    """Structured output for one request: which tokens may come next, fed the tokens as they are chosen."""

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens allowed as the next one."""
        ...

    def advance(self, token: int) -> None:
        """The token chosen (always one that allowed() permitted)."""
        ...

    def is_finished(self) -> bool:
        """The structure is complete: the request stops (stop_reason "constraint")."""
        ...


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    constraint: Constraint | None = None
    id: int = field(default_factory=lambda: next(_ids))


@dataclass
class TokenEvent:
    token: int
    text: str            # the printable text this token completed ("" if none yet)


class QueueFull(Exception):
    """The scheduler's queue is full: try again later (a server answers 429)."""


_DONE = object()


class Handle:
    """One submitted request as its submitter sees it. The scheduler calls `_emit` and `_finish`; the
    submitter iterates `events()` and may `cancel()` (the row is freed at the scheduler's next step)."""

    def __init__(self, request: Request):
        self.request = request
        self.result = None               # GenerationResult once finished
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue()
        self._listener = None
        self._lock = threading.Lock()    # orders listen() against the scheduler's deliveries
        self._cancelled = threading.Event()
        self._finished = threading.Event()

    # -- the submitter's side --------------------------------------------------------------------
    def events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        """The request's tokens as they come; raises the scheduler's error if the request failed."""
        if self._listener is not None:
            raise RuntimeError("this request's tokens go to the callback given to listen(), not to events()")
        while True:
            item = self._queue.get(timeout=timeout)
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def listen(self, callback) -> None:
        """Instead of events(): `callback(event)` for each TokenEvent, then `callback(None)` at the end (see
        `error`), called on the scheduler's thread, those emitted before this call first. A server's event
        loop passes its call_soon_threadsafe here: no thread per request waits on the queue."""
        with self._lock:
            if self._listener is not None:
                raise RuntimeError("a request's tokens go to one listener; listen() was called already")
            while not self._queue.empty():
                item = self._queue.get_nowait()
                callback(None if item is _DONE else item)
            self._listener = callback

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    # -- the scheduler's side --------------------------------------------------------------------
    def _emit(self, token: int, text: str) -> None:
        self._deliver(TokenEvent(token, text))

    def _finish(self, result=None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self._finished.set()
        self._deliver(_DONE)

    def _deliver(self, item) -> None:
        with self._lock:
            if self._listener is None:
                self._queue.put(item)
            else:
                self._listener(None if item is _DONE else item)


class Scheduler(Protocol):
    max_batch: int

    def submit(self, request: Request) -> Handle:
        """Queue a request (raises QueueFull when the queue is full, UserError for a bad request)."""
        ...

    def stats(self) -> dict:
        """{"queued": n, "running": rows in use, "max_batch": n, "steps": decode steps so far, ...}."""
        ...

    def close(self, drain: bool = True) -> None:
        """Stop taking requests; finish (drain=True) or cancel the ones in flight; join the thread."""
        ...
