"""The TensorRT backend's CUDA side on a real GPU: device memory, copies, the staging path.

These need an NVIDIA GPU and cuda-python and skip without them (CI has neither). Running an engine
end to end also needs a TensorRT that supports that GPU (full TensorRT, or TensorRT-RTX on an
RTX / Ampere-or-later consumer or workstation GPU); that test skips where there is none.
"""
from __future__ import annotations

import numpy as np
import pytest

from ardeploy.runtime.backends.trt import ALIGN, staging_slot_bytes, step_binding
from ardeploy.runtime.cuda import Cuda, query_gpu
from ardeploy.runtime.bundle import BundleError
from ardeploy.runtime.kv_arena import KVArena


@pytest.fixture(scope="module")
def cuda():
    try:
        gpu = query_gpu()
    except BundleError:
        gpu = None
    if gpu is None:
        pytest.skip("needs an NVIDIA GPU and cuda-python (pip install cuda-python)")
    try:
        c = Cuda(0)
    except BundleError as e:
        pytest.skip(str(e))
    yield c
    c.close()


def test_query_gpu_names_the_device(cuda):
    name, cc = query_gpu()
    assert name and cc.count(".") == 1 and all(p.isdigit() for p in cc.split("."))
    print(f"GPU: {name}, compute capability {cc}")


def test_device_memory_round_trip_and_alignment(cuda):
    ptrs = [cuda.malloc(n) for n in (1, 1000, 4096 + 7)]
    assert all(p % ALIGN == 0 for p in ptrs)
    src = np.arange(1000, dtype=np.uint8)
    cuda.copy(ptrs[1], src.ctypes.data, src.nbytes, Cuda.H2D)
    cuda.copy(ptrs[2] + 3, ptrs[1], 1000, Cuda.D2D)                   # to an odd, unaligned address
    back = np.zeros(1000, np.uint8)
    cuda.copy(back.ctypes.data, ptrs[2] + 3, 1000, Cuda.D2H)
    cuda.sync()
    np.testing.assert_array_equal(back, src)


def test_staging_copies_land_at_the_arena_position(cuda):
    """SmolLM2-like FP16 rows of 384 bytes at batch 1: odd positions are staged; after the copy the
    arena holds each step's row at its position, and earlier rows are untouched."""
    L, n_kv, hd, max_seq = 2, 3, 64, 16
    arena = KVArena(L, max_seq, 1, n_kv, hd, np.float16, lambda n, dt: (None, cuda.malloc(n * 2)))
    arena.reset(1)
    slot = staging_slot_bytes(1, n_kv, hd, 2)
    staging = cuda.malloc(2 * L * slot)
    rows = {}
    for P in range(max_seq):
        assert arena.length == P
        b = step_binding(arena, 1, int(P > 0), 0, 0, 0, staging, slot)
        for i in range(L):
            for kv, name in ((0, "key"), (1, "value")):
                row = np.full(n_kv * hd, P * 10 + 2 * i + kv, np.float16)     # what the engine would write
                rows[(P, i, kv)] = row
                cuda.copy(b.addresses[f"present.{i}.{name}"], row.ctypes.data, row.nbytes, Cuda.H2D)
        for dst, src, n in b.copies:
            cuda.copy(dst, src, n, Cuda.D2D)
        cuda.sync()
        assert bool(b.copies) == bool((P * 384) % ALIGN)
        arena.advance(1)
    for i in range(L):
        for kv in (0, 1):
            addr, shape = arena.region(i, kv, 0, max_seq)
            back = np.zeros(int(np.prod(shape)), np.float16)
            cuda.copy(back.ctypes.data, addr, back.nbytes, Cuda.D2H)
            cuda.sync()
            got = back.reshape(max_seq, n_kv * hd)
            for P in range(max_seq):
                np.testing.assert_array_equal(got[P], rows[(P, i, kv)])
