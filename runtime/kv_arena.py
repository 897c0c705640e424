"""The KV arena: one preallocated buffer per layer and K/V, in the layout the bundle's graph wants.

Time-major, [max_seq, B, n_kv, head_dim] (the portable graphs, TensorRT): because time is the
outermost axis, the first P positions of every sequence in the batch are one contiguous block
(`past`), and so are positions [P, P+S) (`present`). Backends bind those blocks by address: prefill
writes slots [0, S), decode step reads [0, P) and writes [P, P+S).

Batch-major, [B, n_kv, max_seq, head_dim] (the ONNX Runtime graph): GroupQueryAttention reads and
writes the whole buffer in place (`cache`), each row at its own length.

The runtime never copies a KV byte; a backend counts what it had to copy anyway in its own
`kv_bytes_copied` (see the TensorRT alignment note in docs/ARCHITECTURE.md), so benchmarks can prove it
stays constant. Arenas start zeroed: attention kernels read positions past a row's length (weighted 0),
and 0 x NaN from stale bytes would be NaN.
"""
from __future__ import annotations

import mmap

import numpy as np


def host_buffer(count: int, dtype) -> tuple[np.ndarray, int]:
    """The default allocation: zeroed host memory of its own anonymous mapping, and its address.
    Its own mapping goes back to the OS whole when the arena is dropped; from malloc's heap (numpy's
    default) a reloaded generator's arena could leave tens of MiB behind (measured by scripts/soak.py)."""
    dtype = np.dtype(dtype)
    pages = mmap.mmap(-1, max(1, count * dtype.itemsize), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer = np.frombuffer(pages, dtype, count)
    return buffer, buffer.ctypes.data


class KVArena:
    def __init__(self, n_layers: int, max_seq: int, max_batch: int, n_kv: int, head_dim: int, dtype,
                 allocate=None, layout: str = "time"):
        """`allocate(n_elements, dtype) -> (buffer, base_address)` of zeroed memory; default: host memory.
        layout: "time" ([max_seq, B, n_kv, hd]) or "batch" ([B, n_kv, max_seq, hd])."""
        if layout not in ("time", "batch"):
            raise ValueError(f"unknown KV layout {layout!r} (time or batch)")
        self.layout = layout
        self.n_layers, self.max_seq, self.max_batch = n_layers, max_seq, max_batch
        self.n_kv, self.head_dim, self.dtype = n_kv, head_dim, np.dtype(dtype)
        elements = max_seq * max_batch * n_kv * head_dim
        allocate = allocate or host_buffer
        # [layer][0 = key, 1 = value] -> (buffer, base address)
        self.buffers = [[allocate(elements, self.dtype) for _ in range(2)] for _ in range(n_layers)]
        self.batch = max_batch
        self._length = 0           # positions [0, length) hold valid K/V; changed only by the methods below

    @property
    def length(self) -> int:
        """Positions [0, length) hold valid K/V for every row of the batch."""
        return self._length

    def advance(self, n: int) -> None:
        """The last step wrote n new positions at [length, length + n)."""
        if not 0 <= self._length + n <= self.max_seq:
            raise IndexError(f"{self._length + n} positions exceed the cache's max_seq {self.max_seq}")
        self._length += n

    def truncate(self, length: int) -> None:
        """Keep only positions [0, length) (e.g. a chat turn that reuses a common prefix)."""
        if not 0 <= length <= self._length:
            raise IndexError(f"cannot truncate the cache to {length} positions (it holds {self._length})")
        self._length = length

    @property
    def nbytes(self) -> int:
        return 2 * self.n_layers * self.max_seq * self.max_batch * self.n_kv * self.head_dim * self.dtype.itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes of one time position for the whole batch."""
        return self.batch * self.n_kv * self.head_dim * self.dtype.itemsize

    def reset(self, batch: int) -> None:
        """Start a new set of sequences; the same memory is re-viewed as [max_seq, batch, n_kv, hd]."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} exceeds the arena's max_batch {self.max_batch}")
        self.batch, self._length = batch, 0

    def cache(self, layer: int, kv: int, row: int | None = None) -> tuple[int, list[int]]:
        """(address, shape) of a batch-major arena's whole buffer for the current batch,
        [B, n_kv, max_seq, hd] (the rows of a smaller batch are the buffer's first ones), or of one row
        of it, [1, n_kv, max_seq, hd] (continuous batching fills rows one at a time)."""
        if self.layout != "batch":
            raise ValueError("cache() is for batch-major arenas; time-major ones bind regions")
        base = self.buffers[layer][kv][1]
        if row is None:
            return base, [self.batch, self.n_kv, self.max_seq, self.head_dim]
        if not 0 <= row < self.batch:
            raise IndexError(f"row {row} outside the arena's batch {self.batch}")
        row_bytes = self.n_kv * self.max_seq * self.head_dim * self.dtype.itemsize
        return base + row * row_bytes, [1, self.n_kv, self.max_seq, self.head_dim]

    def region(self, layer: int, kv: int, start: int, stop: int) -> tuple[int, list[int]]:
        """(address, shape) of positions [start, stop) of one layer's K (kv=0) or V (kv=1)
        (time-major arenas)."""
        if self.layout != "time":
            raise ValueError("region() is for time-major arenas; batch-major ones bind the whole cache")
        if not 0 <= start <= stop <= self.max_seq:
            raise IndexError(f"KV positions [{start}, {stop}) outside the arena (max_seq {self.max_seq})")
        base = self.buffers[layer][kv][1]
        return base + start * self.row_bytes, [stop - start, self.batch, self.n_kv, self.head_dim]

    def view(self, layer: int, kv: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Host view of positions [start, stop), time-major [T, B, n_kv, hd] whatever the layout
        (host arenas only): for tests and inspection."""
        buf = self.buffers[layer][kv][0][: self.max_seq * self.batch * self.n_kv * self.head_dim]
        if self.layout == "batch":
            rows = buf.reshape(self.batch, self.n_kv, self.max_seq, self.head_dim).transpose(2, 0, 1, 3)
        else:
            rows = buf.reshape(self.max_seq, self.batch, self.n_kv, self.head_dim)
        return rows[start: self.length if stop is None else stop]
