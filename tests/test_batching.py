"""Continuous batching (runtime/batching.py over decode.Slots): requests join a running batch between
steps and leave when done; each gets exactly the tokens it gets alone."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from ardeploy.runtime import Generator, SamplingConfig
from ardeploy.runtime.batching import BatchingScheduler
from ardeploy.runtime.bundle import BundleError
from ardeploy.runtime.errors import UserError
from ardeploy.runtime.scheduling import QueueFull, Request
from conftest import rng_ids, threads


@pytest.fixture(scope="module")
def bundle(tiny_hf, export_once):
    return export_once(tiny_hf("gqa8x2_untied_linear")[0], max_seq=128, max_batch=4)


def alone(bundle, request: Request) -> list[int]:
    gen = Generator.load(bundle, threads=threads(), max_batch=1)
    return gen.generate(request.prompt_ids, request.sampling).token_ids


def requests(n: int) -> list[Request]:
    """Prompts of different lengths and budgets, greedy and seeded sampling mixed."""
    out = []
    for i in range(n):
        cfg = SamplingConfig(greedy=True, max_new_tokens=6 + 5 * (i % 4), ignore_eos=True) if i % 2 == 0 else \
            SamplingConfig(temperature=0.8, top_p=0.9, seed=100 + i, max_new_tokens=9 + 3 * (i % 3), ignore_eos=True)
        out.append(Request(rng_ids(3 + 4 * (i % 5), seed=i), cfg))
    return out


def test_requests_joining_a_running_batch_get_their_tokens_alone(bundle):
    """Ten requests into four rows, from several threads: they queue, join as rows free up, and each
    returns exactly the tokens of the same request run alone (greedy and seeded sampling)."""
    scheduler = BatchingScheduler(Generator.load(bundle, threads=threads()), max_queue=16)
    reqs = requests(10)
    gate = Gate()        # allows every token; holds the first request in its row until the others are queued,
    reqs[0] = Request(reqs[0].prompt_ids, reqs[0].sampling, gate)   # so that rows surely run together
    handles = [scheduler.submit(reqs[0])] + [None] * (len(reqs) - 1)
    assert gate.reached.wait(30)

    def submit(i):
        handles[i] = scheduler.submit(reqs[i])
    workers = [threading.Thread(target=submit, args=(i,)) for i in range(1, len(reqs))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    gate.open.set()
    got = [[e.token for e in h.events(timeout=60)] for h in handles]
    stats = scheduler.stats()
    scheduler.close()
    for request, tokens, handle in zip(reqs, got, handles):
        assert tokens == handle.result.token_ids == alone(bundle, request)
    assert stats["admitted"] == 10 and stats["finished"] == 10
    assert stats["row_steps"] > stats["steps"]            # rows really ran together


class Gate:
    """A constraint that allows everything but holds the scheduler while it picks the long request's
    second token, until the test (told that the gate was reached) opens it: the cancel then lands at a
    known step."""

    def __init__(self):
        self.reached, self.open, self.calls = threading.Event(), threading.Event(), 0

    def allowed(self):
        self.calls += 1
        if self.calls == 2:
            self.reached.set()
            self.open.wait(10)
        return np.ones(256, bool)

    def advance(self, token):
        pass

    def is_finished(self):
        return False


def test_cancel_frees_the_row_at_the_next_step(bundle):
    scheduler = BatchingScheduler(Generator.load(bundle, threads=threads(), max_batch=1), max_queue=4)
    gate = Gate()
    long = scheduler.submit(Request(rng_ids(5), SamplingConfig(greedy=True, max_new_tokens=100, ignore_eos=True),
                                    gate))
    short_request = Request(rng_ids(4, seed=3), SamplingConfig(greedy=True, max_new_tokens=5, ignore_eos=True))
    short = scheduler.submit(short_request)
    assert gate.reached.wait(30)
    long.cancel()
    gate.open.set()
    assert [e.token for e in short.events(timeout=30)] == alone(bundle, short_request)   # it got the one row
    assert long.wait(5) and long.result.stop_reason == "cancelled" and len(long.result.token_ids) == 2
    scheduler.close()
    assert scheduler.stats()["cancelled"] == 1


def test_a_full_queue_is_refused_and_bad_requests_are_one_line(bundle):
    scheduler = BatchingScheduler(Generator.load(bundle, threads=threads(), max_batch=1), max_queue=1)
    cfg = SamplingConfig(greedy=True, max_new_tokens=60, ignore_eos=True)
    gate = Gate()                                              # holds the first request in its row
    first = scheduler.submit(Request(rng_ids(5), cfg, gate))
    assert gate.reached.wait(30)
    second = scheduler.submit(Request(rng_ids(5), cfg))        # waits in the queue
    with pytest.raises(QueueFull):
        scheduler.submit(Request(rng_ids(5), cfg))
    for bad, needle in (([], "empty prompt"), ([5, 300], "outside the vocabulary"), (list(range(3, 131)), "max_seq")):
        with pytest.raises(UserError, match=needle):
            scheduler.submit(Request(bad, cfg))
    gate.open.set()
    scheduler.close(drain=False)                               # cancels what is still running or waiting
    assert first.wait(5) and second.wait(5)
    with pytest.raises(QueueFull, match="shutting down"):
        scheduler.submit(Request(rng_ids(5), cfg))


class OnlyTokens:
    """A stand-in structured-output constraint: only `allowed` tokens, finished after `n` of them."""

    def __init__(self, allowed, vocab, n):
        self.mask = np.zeros(vocab, bool)
        self.mask[list(allowed)] = True
        self.n, self.taken = n, []

    def allowed(self):
        return self.mask

    def advance(self, token):
        self.taken.append(token)

    def is_finished(self):
        return len(self.taken) >= self.n


def test_each_row_applies_its_own_constraint(bundle):
    scheduler = BatchingScheduler(Generator.load(bundle, threads=threads()), max_queue=8)
    constraints = [OnlyTokens({10, 11, 12}, 256, 5), OnlyTokens({200, 201}, 256, 7), None]
    cfgs = [SamplingConfig(temperature=1.0, seed=1, max_new_tokens=20, ignore_eos=True),
            SamplingConfig(greedy=True, max_new_tokens=20, ignore_eos=True),
            SamplingConfig(greedy=True, max_new_tokens=8, ignore_eos=True)]
    handles = [scheduler.submit(Request(rng_ids(6, seed=i), cfg, c)) for i, (cfg, c) in enumerate(zip(cfgs, constraints))]
    results = [[e.token for e in h.events(timeout=60)] for h in handles]
    scheduler.close()
    assert set(results[0]) <= {10, 11, 12} and len(results[0]) == 5
    assert set(results[1]) <= {200, 201} and len(results[1]) == 7
    assert handles[0].result.stop_reason == handles[1].result.stop_reason == "constraint"
    assert results[2] == alone(bundle, Request(rng_ids(6, seed=2), cfgs[2]))


def test_the_portable_graph_is_refused_in_one_line(bundle):
    with pytest.raises(BundleError, match="own length"):
        BatchingScheduler(Generator.load(bundle, threads=threads(), flavor="portable"))


def test_a_request_cancelled_while_waiting_gets_a_cancelled_result(bundle):
    scheduler = BatchingScheduler(Generator.load(bundle, threads=threads(), max_batch=1), max_queue=4)
    gate = Gate()
    first = scheduler.submit(Request(rng_ids(5), SamplingConfig(greedy=True, max_new_tokens=6, ignore_eos=True),
                                     gate))
    assert gate.reached.wait(30)
    waiting = scheduler.submit(Request(rng_ids(4), SamplingConfig(greedy=True, max_new_tokens=6)))
    waiting.cancel()
    gate.open.set()
    assert waiting.wait(30) and first.wait(30)
    scheduler.close()
    assert waiting.result.stop_reason == "cancelled" and waiting.result.token_ids == []
    assert first.result.stop_reason == "max_new_tokens"
    stats = scheduler.stats()
    assert (stats["finished"], stats["cancelled"]) == (1, 1)        # each request counted once


def test_a_lone_request_runs_at_batch_one(bundle, monkeypatch):
    """Rows are taken lowest first and a step runs rows 0 .. the last busy one: one request alone does
    not pay for the free rows."""
    gen = Generator.load(bundle, threads=threads())
    widths = []
    step_rows = gen.backend.step_rows

    def spy(ids, lengths, arena, row=None):
        if row is None:
            widths.append(ids.shape[0])
        return step_rows(ids, lengths, arena, row)
    monkeypatch.setattr(gen.backend, "step_rows", spy)
    scheduler = BatchingScheduler(gen, max_queue=4)
    request = Request(rng_ids(6), SamplingConfig(greedy=True, max_new_tokens=8, ignore_eos=True))
    assert [e.token for e in scheduler.submit(request).events(timeout=30)] == alone(bundle, request)
    scheduler.close()
    assert widths and set(widths) == {1}


def test_a_listener_gets_every_event_once_in_order_then_the_end():
    """Handle.listen (the server's bridge to its event loop): events emitted before it are delivered first,
    then each later one as it comes, then None; a failed request's error is on the handle."""
    from ardeploy.runtime.scheduling import Handle
    handle, got = Handle(Request([1])), []
    handle._emit(1, "a")
    handle._emit(2, "b")
    handle.listen(got.append)
    handle._emit(3, "c")
    handle._finish(error=RuntimeError("boom"))
    assert [None if e is None else (e.token, e.text) for e in got] == [(1, "a"), (2, "b"), (3, "c"), None]
    assert isinstance(handle.error, RuntimeError)
    # delivered from the scheduler's thread while a listener attaches: none lost, none twice, in order
    for _ in range(20):
        handle, got = Handle(Request([1])), []
        emitter = threading.Thread(target=lambda h=handle: ([h._emit(i, "") for i in range(500)], h._finish()))
        emitter.start()
        handle.listen(got.append)
        emitter.join()
        assert [e.token for e in got[:-1]] == list(range(500)) and got[-1] is None
    # a handle with a listener has no queue to read: events() and a second listen() say so instead of waiting
    with pytest.raises(RuntimeError, match="listen"):
        next(handle.events(timeout=0.1))
    with pytest.raises(RuntimeError, match="listen"):
        handle.listen(got.append)
