"""Which generator and scheduler a server runs: the one place that picks the engine.

The server above needs only the protocol of `ardeploy.runtime.scheduling` (submit / stats / close and
Handles). With more than one row and a backend whose rows keep their own lengths (the ONNX Runtime graph),
requests are continuously batched (`runtime/batching.BatchingScheduler`: they join the running batch
between decode steps); otherwise `SequentialScheduler` runs them one at a time.
"""
from __future__ import annotations

from ardeploy.runtime.errors import UserError
from ardeploy.runtime.generator import Generator

from .scheduler import SequentialScheduler


def build_engine(bundle, max_batch: int | None = None, max_queue: int = 64, options=None, warmup: bool = True,
                 scheduler: str = "auto", kv_budget=None, **changes):
    """(generator, scheduler) for a bundle. max_batch: rows run at once (None: the bundle's limit).
    options: a RunOptions (runtime/run_options.py); `changes` override single fields (threads=1).
    scheduler: "auto", "batching" or "sequential"."""
    from ardeploy.runtime.bundle import Bundle
    limit = Bundle.load(bundle).max_batch
    if max_batch is not None and not 1 <= max_batch <= limit:
        raise UserError(f"--max-batch {max_batch} is outside [1, {limit}] (the bundle was exported with "
                        f"--max-batch {limit})")
    if scheduler not in ("auto", "batching", "sequential"):
        raise UserError(f"unknown scheduler {scheduler!r} (auto, batching or sequential)")
    rows = max_batch or limit
    generator = Generator.load(bundle, options, max_batch=rows, warmup=warmup, kv_budget=kv_budget, **changes)
    try:
        batching = scheduler == "batching" or (scheduler == "auto" and rows > 1 and generator.backend.rows_own_lengths)
        if batching:
            from ardeploy.runtime.batching import BatchingScheduler
            return generator, BatchingScheduler(generator, max_queue=max_queue)
        return generator, SequentialScheduler(generator, max_queue=max_queue)
    except BaseException:
        generator.close()
        raise
