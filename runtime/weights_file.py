"""The bundle's weights file: every tensor once, large ones on 64 KiB boundaries (memory-mappable).

Export and calibration both write weights.bin through this one writer; graphs point into it with
ONNX external data (`location`, `offset`, `length`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

LARGE_TENSOR_BYTES = 1 << 16    # tensors at least this large start on a 64 KiB boundary (mmap-friendly on every OS)
SMALL_ALIGN = 64                # smaller tensors on 64-byte boundaries


class WeightsFile:
    """Appends raw tensor bytes to one file; `put` is idempotent per name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.offset = 0                                   # bytes written so far (the file's size)
        self.placed: dict[str, tuple[int, int]] = {}      # name -> (offset, length)

    def put(self, name: str, data) -> tuple[int, int]:
        """Write `data` (a numpy array or a bytes-like object) once; returns (offset, length)."""
        if name in self.placed:
            return self.placed[name]
        raw = memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1)) if isinstance(data, np.ndarray) \
            else memoryview(data).cast("B")
        pad = -self.offset % (LARGE_TENSOR_BYTES if raw.nbytes >= LARGE_TENSOR_BYTES else SMALL_ALIGN)
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        self.file.write(raw)
        self.placed[name] = (self.offset, raw.nbytes)
        self.offset += raw.nbytes
        return self.placed[name]

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
