"""The TensorRT backend's binding logic, without a GPU.

`step_binding` is checked on SmolLM2's geometry at every decode position (all addresses 256-byte
aligned, staging copies only where needed and of constant size). Then the backend's own `step`
code runs end to end with two stand-ins: host memory for CUDA (256-byte aligned buffers, memmove
for copies) and, for each TensorRT execution context, ONNX Runtime running the decode graph with
I/O bound at exactly the addresses and shapes the backend set. Its logits and KV arena must match
the ONNX Runtime backend's, step by step.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from ardeploy.runtime.backends.base import Backend
from ardeploy.runtime.backends.ort import OrtBackend
from ardeploy.runtime.backends.trt import ALIGN, TrtBackend, engine_runs, staging_slot_bytes, step_binding
from ardeploy.runtime.cuda import Cuda
from ardeploy.runtime.bundle import Bundle
from ardeploy.runtime.kv_arena import KVArena
from conftest import rng_ids, threads


def fake_arena(n_layers, max_seq, max_batch, n_kv, hd, dtype, base=1 << 40):
    """An arena whose buffers are fake, 256-aligned addresses (nothing is allocated)."""
    state = {"next": base}

    def allocate(count, dt):
        addr = state["next"]
        state["next"] += (count * np.dtype(dt).itemsize + 2 * ALIGN) // ALIGN * ALIGN
        return None, addr
    return KVArena(n_layers, max_seq, max_batch, n_kv, hd, dtype, allocate)


@pytest.mark.parametrize("batch", [1, 2])
def test_step_binding_smollm2_geometry_every_position(batch):
    """SmolLM2 FP16: 3 KV heads x 64 x 2 bytes = 384-byte rows at batch 1, so every odd decode position
    starts off the 256-byte grid and goes through a staging slot; batch 2 (768-byte rows) never does."""
    L, n_kv, hd, max_seq = 30, 3, 64, 1024
    arena = fake_arena(L, max_seq, 2, n_kv, hd, np.float16)
    arena.reset(batch)
    slot = staging_slot_bytes(2, n_kv, hd, 2)
    staging = 1 << 44
    row = batch * n_kv * hd * 2
    b = step_binding(arena, 17, 0, 1 << 45, (1 << 45) + 4096, (1 << 45) + 8192, staging, slot)
    assert b.profile == 0 and not b.copies
    assert b.shapes["input_ids"] == (batch, 17) and b.shapes["attention_mask"] == (batch, 17)
    for i in range(L):
        for kv, name in ((0, "key"), (1, "value")):
            base = arena.region(i, kv, 0, 0)[0]
            assert b.shapes[f"past.{i}.{name}"] == (0, batch, n_kv, hd)
            assert b.addresses[f"past.{i}.{name}"] == base           # empty, but a valid address
            assert b.addresses[f"present.{i}.{name}"] == base
    arena.advance(17)
    copied = []
    for P in range(17, max_seq):
        assert arena.length == P
        b = step_binding(arena, 1, 1, 1 << 45, (1 << 45) + 4096, (1 << 45) + 8192, staging, slot)
        assert b.profile == 1
        assert b.shapes["attention_mask"] == (batch, P + 1)
        assert all(a % ALIGN == 0 for a in b.addresses.values())
        for i in (0, L - 1):
            assert b.shapes[f"past.{i}.value"] == (P, batch, n_kv, hd)
        misaligned = (P * row) % ALIGN != 0
        assert len(b.copies) == (2 * L if misaligned else 0)
        for dst, src, n in b.copies:
            assert n == row and staging <= src < staging + 2 * L * slot and dst % ALIGN != 0
        # every present block, staged or not, ends up at arena position P
        targets = {dst for dst, _, _ in b.copies} | {a for k, a in b.addresses.items() if k.startswith("present.")}
        expected = {arena.region(i, kv, P, P + 1)[0] for i in range(L) for kv in (0, 1)}
        assert expected <= targets
        copied.append(sum(n for _, _, n in b.copies))
        arena.advance(1)
    assert set(copied) == ({0, 2 * L * row} if batch == 1 else {0})    # O(1) per step, never grows with P


def test_engine_runs_prefill_once_then_one_token_per_run():
    assert engine_runs(0, 9) == [(0, 9, "prefill")]
    assert engine_runs(9, 1) == [(0, 1, "decode")]
    assert engine_runs(9, 3) == [(0, 1, "decode"), (1, 2, "decode"), (2, 3, "decode")]    # a new chat turn


def test_step_binding_refuses_unaligned_arena_and_oversized_staging():
    arena = KVArena(2, 16, 1, 2, 16, np.float32, lambda n, dt: (None, 1000))      # 1000 is not 256-aligned
    with pytest.raises(ValueError, match="aligned"):
        step_binding(arena, 1, 0, 0, 0, 0, 0, 256)
    arena = fake_arena(2, 16, 1, 2, 16, np.float32)
    arena.advance(1)                                                            # 128-byte rows: unaligned
    with pytest.raises(ValueError, match="staging slot"):
        step_binding(arena, 3, 1, 0, 0, 0, 1 << 44, 256)


# -- the backend's step() with host memory and ONNX Runtime standing in for CUDA and TensorRT ----------------
class HostCuda:
    H2D, D2H, D2D = Cuda.H2D, Cuda.D2H, Cuda.D2D
    stream_handle = 0

    def __init__(self):
        self.keep = []

    def malloc(self, nbytes):
        buf = np.zeros(int(nbytes) + ALIGN, np.uint8)
        self.keep.append(buf)
        return buf.ctypes.data + (-buf.ctypes.data) % ALIGN

    def copy(self, dst, src, nbytes, kind):
        ctypes.memmove(dst, src, nbytes)

    def zero(self, ptr, nbytes):
        ctypes.memset(ptr, 0, nbytes)

    def sync(self):
        pass


class OrtContext:
    """IExecutionContext's calls the backend makes, carried out by ONNX Runtime on the same addresses."""

    def __init__(self, session, graph):
        self.session, self.graph = session, graph
        self.shapes, self.addresses, self.runs = {}, {}, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, addr):
        assert addr % ALIGN == 0, f"{name} bound at an address TensorRT would refuse"
        self.addresses[name] = addr

    def execute_async_v3(self, stream):
        io = self.session.io_binding()
        B, S = self.shapes["input_ids"]
        for x in self.graph["inputs"]:
            dt = np.dtype(x["dtype"])
            io.bind_input(x["name"], "cpu", 0, dt, list(self.shapes[x["name"]]), self.addresses[x["name"]])
        for x in self.graph["outputs"]:
            shape = [B, x["shape"][1]] if x["name"] == "logits" else [S, B, *x["shape"][2:]]
            io.bind_output(x["name"], "cpu", 0, np.dtype(x["dtype"]), shape, self.addresses[x["name"]])
        self.session.run_with_iobinding(io)
        self.runs += 1
        return True


def host_trt_backend(bundle: Bundle):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads()
    session = ort.InferenceSession(str(bundle.graph_path("decode")), so, providers=["CPUExecutionProvider"])
    backend = object.__new__(TrtBackend)
    Backend.__init__(backend)
    backend.bundle, backend.cuda = bundle, HostCuda()
    graph = bundle.manifest["graphs"]["decode"]
    backend.contexts = [OrtContext(session, graph), OrtContext(session, graph)]
    backend.prefill_profile, backend.decode_profile = 0, 1
    backend._allocate_io(bundle.max_seq, bundle.max_batch)
    return backend


def read(arena: KVArena, layer: int, kv: int, stop: int) -> np.ndarray:
    addr, shape = arena.region(layer, kv, 0, stop)
    n = int(np.prod(shape)) * arena.dtype.itemsize
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * n).from_address(addr)) if n else np.zeros(0, np.uint8)
    return raw.view(arena.dtype).reshape(shape).copy()


@pytest.fixture(scope="module")
def tiny_fp32(tiny_hf, export_once):
    folder, _ = tiny_hf("gqa_tied_llama3_bias")
    return Bundle.load(export_once(folder, max_seq=128, max_batch=2))


@pytest.mark.parametrize("batch", [1, 2])
def test_backend_step_matches_onnx_runtime_backend(tiny_fp32, batch):
    """Prefill (left-padded when batch 2), greedy decode steps, then a 4-token new turn that the TensorRT
    backend runs as 4 one-token decode steps: same logits and the same arena as the ONNX Runtime backend.
    Tiny rows are 128 bytes at batch 1, so odd positions exercise the staging copy."""
    bundle = tiny_fp32
    # the reference runs the graph TensorRT builds from: the portable decode graph
    trt, ref = host_trt_backend(bundle), OrtBackend(bundle, threads=threads(), flavor="portable")
    a_trt, a_ref = trt.new_arena(batch), ref.new_arena(batch)
    for a in (a_trt, a_ref):
        a.reset(batch)
    prompts = [rng_ids(7, seed=1), rng_ids(4, seed=2)][:batch]
    ids = np.zeros((batch, 7), np.int64)
    mask = np.zeros((batch, 7), np.int64)
    for r, p in enumerate(prompts):
        ids[r, 7 - len(p):], mask[r, 7 - len(p):] = p, 1
    L = bundle.n_layers
    row = a_trt.row_bytes
    feed_ids, feed_mask = ids, mask
    for step in range(7):
        before = trt.kv_bytes_copied
        got = trt.step(feed_ids, feed_mask, a_trt).copy()
        want = ref.step(feed_ids, feed_mask, a_ref).copy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert a_trt.length == a_ref.length
        if 1 <= step <= 5:
            P = a_trt.length - 1
            assert trt.kv_bytes_copied - before == (2 * L * row if (P * row) % ALIGN else 0)
        if step < 5:                       # greedy next token
            feed_ids = want.argmax(-1)[:, None].astype(np.int64)
            feed_mask = np.concatenate([feed_mask, np.ones((batch, 1), np.int64)], axis=1)
        else:                              # a new turn of 4 tokens on top of the cache
            feed_ids = np.array([rng_ids(4, seed=7 + r) for r in range(batch)], np.int64)
            feed_mask = np.concatenate([feed_mask, np.ones((batch, 4), np.int64)], axis=1)
    for i in range(L):
        for kv in (0, 1):
            np.testing.assert_allclose(read(a_trt, i, kv, a_trt.length), a_ref.view(i, kv), atol=1e-4, rtol=0)
    assert trt.contexts[0].runs == 1 and trt.contexts[1].runs == 5 + 4
    assert (trt.kv_bytes_copied > 0) == (batch == 1)
