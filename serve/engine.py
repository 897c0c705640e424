"""Which generator and scheduler a server runs: the one place that picks the engine.

The server above needs only the protocol of `ardeploy.runtime.scheduling` (submit / stats / close and
Handles); `build_engine` is where a batching scheduler replaces `SequentialScheduler`.
"""
from __future__ import annotations

from ardeploy.runtime.errors import UserError
from ardeploy.runtime.generator import Generator

from .scheduler import SequentialScheduler


def build_engine(bundle, max_batch: int | None = None, max_queue: int = 64, backend: str = "ort",
                 warmup: bool = True, **backend_kw):
    """(generator, scheduler) for a bundle. max_batch: rows run at once (None: the bundle's limit); the
    sequential scheduler runs one, so its generator allocates one row of cache."""
    from ardeploy.runtime.bundle import Bundle
    limit = Bundle.load(bundle).max_batch
    if max_batch is not None and not 1 <= max_batch <= limit:
        raise UserError(f"--max-batch {max_batch} is outside [1, {limit}] (the bundle was exported with "
                        f"--max-batch {limit})")
    generator = Generator.load(bundle, backend=backend, max_batch=1, warmup=warmup, **backend_kw)
    try:
        return generator, SequentialScheduler(generator, max_queue=max_queue)
    except BaseException:
        generator.close()
        raise
