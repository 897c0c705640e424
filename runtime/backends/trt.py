"""TensorRT backend: one engine built from the decode graph, its K/V bound by address into the arena.

    backend = TrtBackend(bundle)           # reads BUNDLE/engines/engines.json, refuses a wrong engine
    arena = backend.new_arena()            # KV in device memory (cudaMalloc: 256-byte aligned)
    logits = backend.step(ids, mask, arena)

The engine has two optimization profiles (engines/profiles.py) and one execution context per
profile; both contexts share one scratch buffer since they never run at the same time. A step with
an empty arena uses the prefill profile (past = 0 positions, bound to the arena's first address: an
empty tensor still needs a valid address); a step after that uses the decode profile, one token
at a time (a new chat turn of S tokens runs as S one-token steps, see engines/profiles.py).

TensorRT wants every tensor address 256-byte aligned. `past` always starts at the arena's base; a
`present` block at position P starts at base + P * row_bytes, which is aligned only when P * row_bytes
is a multiple of 256 (SmolLM2 FP16, batch 1: 384-byte rows, so every odd P is not). Such an output
is bound to a small aligned staging slot and copied into the arena after the step: S rows per layer
and K/V, independent of P, counted in `arena.bytes_copied`.

The arithmetic (which address and shape each tensor gets) is `plan_step`, a pure function tested
without a GPU. Device memory and copies go through cuda-python (`cuda.bindings`), imported lazily.
No torch here.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle import Bundle, BundleError
from ..kv_arena import KVArena
from .base import check_step

ALIGN = 256


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


# -- binding arithmetic (pure) -----------------------------------------------------------------------------
@dataclass
class StepBinding:
    profile: int                                   # index into the engine's profiles
    shapes: dict[str, tuple] = field(default_factory=dict)       # input name -> shape
    addresses: dict[str, int] = field(default_factory=dict)      # tensor name -> device address
    copies: list[tuple[int, int, int]] = field(default_factory=list)   # (dst, src, nbytes) after the run


def staging_slot_bytes(max_batch: int, n_kv: int, head_dim: int, itemsize: int, rows: int = 1) -> int:
    """Bytes of one staging slot (one layer, K or V): `rows` positions for the largest batch, aligned."""
    return align_up(rows * max_batch * n_kv * head_dim * itemsize)


def plan_runs(past: int, seq: int) -> list[tuple[int, int, str]]:
    """How one `step` of `seq` tokens after `past` cached ones maps onto engine runs: (first, stop, profile).

    An empty cache: one prefill run. Otherwise one decode run per token, because the decode profile
    is tuned for (and, to keep the weights once, limited to) one or two new tokens.
    """
    if past == 0:
        return [(0, seq, "prefill")]
    return [(j, j + 1, "decode") for j in range(seq)]


def plan_step(arena: KVArena, seq: int, profile: int, ids_addr: int, mask_addr: int, logits_addr: int,
              staging_base: int, slot_bytes: int) -> StepBinding:
    """Shapes and addresses for one engine run of `seq` new tokens after the arena's `length` cached ones.

    past.{i}.{k,v}     arena [0, P)           (P = 0: empty, bound to the base address)
    present.{i}.{k,v}  arena [P, P + seq)     or staging slot 2*i+kv when that address is not aligned
    """
    P, B = arena.length, arena.batch
    b = StepBinding(profile)
    b.shapes["input_ids"] = (B, seq)
    b.shapes["attention_mask"] = (B, P + seq)
    b.addresses.update({"input_ids": ids_addr, "attention_mask": mask_addr, "logits": logits_addr})
    nbytes = seq * arena.row_bytes
    for i in range(arena.n_layers):
        for kv, name in ((0, "key"), (1, "value")):
            addr, shape = arena.region(i, kv, 0, P)
            if addr % ALIGN:
                raise ValueError(f"KV arena buffer of layer {i} is not {ALIGN}-byte aligned")
            b.shapes[f"past.{i}.{name}"] = tuple(shape)
            b.addresses[f"past.{i}.{name}"] = addr
            dst, _ = arena.region(i, kv, P, P + seq)
            if dst % ALIGN == 0:
                b.addresses[f"present.{i}.{name}"] = dst
            else:
                if nbytes > slot_bytes:
                    raise ValueError(f"{seq} unaligned rows ({nbytes} B) exceed the staging slot ({slot_bytes} B)")
                src = staging_base + (2 * i + kv) * slot_bytes
                b.addresses[f"present.{i}.{name}"] = src
                b.copies.append((dst, src, nbytes))
    return b


# -- CUDA through cuda-python ------------------------------------------------------------------------------
def _cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart          # cuda-python < 12.6
        except ImportError:
            raise BundleError("the TensorRT backend needs cuda-python: pip install cuda-python") from None
    return cudart


def _nvidia_smi() -> tuple[str, str] | None:
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or "," not in out[0]:
        return None
    name, cc = (s.strip() for s in out[0].rsplit(",", 1))
    return name, cc


def query_gpu(device: int = 0) -> tuple[str, str] | None:
    """(name, 'major.minor') of a visible NVIDIA GPU, or None when there is none (no driver, no device)."""
    try:
        cudart = _cudart()
    except BundleError:
        return _nvidia_smi()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count <= device:
        return None
    err, props = cudart.cudaGetDeviceProperties(device)
    if int(err) != 0:
        return None
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


class Cuda:
    """The few CUDA runtime calls the backend needs: memory, copies, one stream."""

    H2D, D2H, D2D = "cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost", "cudaMemcpyDeviceToDevice"

    def __init__(self, device: int = 0):
        self.rt = _cudart()
        if query_gpu(device) is None:
            raise BundleError("the TensorRT backend needs an NVIDIA GPU and driver; none is visible here")
        self.check(self.rt.cudaSetDevice(device))
        self.stream = self.check(self.rt.cudaStreamCreate())
        self.owned: list[int] = []

    def check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            name = self.rt.cudaGetErrorString(err)[1]
            raise RuntimeError(f"CUDA error {int(err)}: {name.decode() if isinstance(name, bytes) else name}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def malloc(self, nbytes: int) -> int:
        ptr = int(self.check(self.rt.cudaMalloc(max(1, int(nbytes)))))
        self.owned.append(ptr)
        return ptr

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        if nbytes:
            self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, getattr(self.rt.cudaMemcpyKind, kind), self.stream))

    def sync(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream))

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def close(self) -> None:
        for ptr in self.owned:
            self.rt.cudaFree(ptr)
        self.owned.clear()


class _DeviceArray:
    """What KVArena keeps per buffer: the address (and nothing to free: Cuda owns it)."""

    def __init__(self, ptr: int, nbytes: int):
        self.ptr, self.nbytes = ptr, nbytes


# -- the backend -----------------------------------------------------------------------------------------
class TrtBackend:
    name = "trt"

    def __init__(self, bundle: Bundle, device: int = 0, cuda_graphs: bool = False, runtime_cache: bool = True,
                 verbose: bool = False):
        from ...engines import compat, record
        from ...engines.profiles import DECODE, PREFILL

        self.bundle = bundle
        rec = self.record = record.load(bundle)
        record.check_graphs(rec, bundle)
        t = self.t = compat.load(rec["tensorrt"]["flavour"])
        record.check_tensorrt(rec, t.flavour, t.version)
        self.cuda = Cuda(device)
        name, cc = query_gpu(device)
        record.check_gpu(rec, name, cc)

        folder = record.engines_dir(bundle)
        eng = rec["engines"][0]
        blob = (folder / eng["file"]).read_bytes()
        log = compat.logger(t, verbose)
        rt = self._runtime = compat.runtime(t, log)
        why = compat.engine_validity(t, rt, blob)
        if why is not None:
            raise BundleError(f"{folder / eng['file']}: {t.label} cannot run this engine on {name} ({cc}): {why}")
        self.engine = compat.deserialize(t, rt, blob)
        del blob
        if self.engine is None:
            raise BundleError(f"{folder / eng['file']}: {t.label} could not load it ({compat.last_error(t)})")
        names = {x["name"] for x in compat.engine_io(t, self.engine)}
        graph = bundle.manifest["graphs"]["decode"]
        want = {x["name"] for x in graph["inputs"] + graph["outputs"]}
        if names != want:
            raise BundleError(f"{folder / eng['file']}: engine I/O {sorted(names ^ want)} differ from the decode graph's")

        profiles = [p["name"] for p in eng["profiles"]]
        self.profiles = eng["profiles"]
        self.prefill_profile, self.decode_profile = profiles.index(PREFILL), profiles.index(DECODE)
        self.cache_path = folder / "runtime.cache"
        blob = self.cache_path.read_bytes() if (runtime_cache and self.cache_path.exists()) else None
        self.runtime_cache = compat.new_runtime_cache(t, self.engine, blob) if runtime_cache else None
        scratch = max(compat.profile_memory(t, self.engine, i) for i in range(len(profiles)))
        self.scratch = self.cuda.malloc(scratch)
        self.contexts = []
        for i in range(len(profiles)):
            ctx = compat.create_context(t, self.engine, i, self.scratch, scratch, self.cuda.stream_handle,
                                        self.runtime_cache, cuda_graphs)
            if ctx is None:
                raise BundleError(f"{t.label} could not create an execution context ({compat.last_error(t)})")
            self.contexts.append(ctx)

        self._allocate_io(rec["max_seq"], rec["max_batch"])
        self.cuda.sync()

    def _allocate_io(self, max_seq: int, max_batch: int) -> None:
        """Device buffers for token ids, mask, logits and the staging slots (one row per layer and K/V)."""
        b = self.bundle
        self.max_seq, self.max_batch = max_seq, max_batch
        n_kv, hd = b.kv_shape
        self.slot_bytes = staging_slot_bytes(max_batch, n_kv, hd, b.kv_dtype.itemsize)
        self.staging = self.cuda.malloc(2 * b.n_layers * self.slot_bytes)
        self.ids_dev = self.cuda.malloc(max_batch * max_seq * 8)
        self.mask_dev = self.cuda.malloc(max_batch * (max_seq + 1) * 8)
        self.logits_dev = self.cuda.malloc(max_batch * b.vocab_size * 4)
        self._logits = np.zeros((max_batch, b.vocab_size), np.float32)
        self._run_s = 0.0

    def new_arena(self, max_batch: int | None = None) -> KVArena:
        b = self.bundle
        if max_batch is not None and max_batch > self.max_batch:
            raise ValueError(f"the engines were built for batch up to {self.max_batch} (asked for {max_batch})")
        n_kv, hd = b.kv_shape

        def allocate(count, dtype):
            nbytes = count * np.dtype(dtype).itemsize
            ptr = self.cuda.malloc(nbytes)
            return _DeviceArray(ptr, nbytes), ptr
        return KVArena(b.n_layers, self.max_seq, max_batch or self.max_batch, n_kv, hd, b.kv_dtype, allocate)

    def run_seconds(self) -> float:
        return self._run_s

    def _run(self, ids: np.ndarray, mask: np.ndarray, arena: KVArena, profile: int) -> None:
        B, S = ids.shape
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        mask = np.ascontiguousarray(mask, dtype=np.int64)
        self.cuda.copy(self.ids_dev, ids.ctypes.data, ids.nbytes, Cuda.H2D)
        self.cuda.copy(self.mask_dev, mask.ctypes.data, mask.nbytes, Cuda.H2D)
        b = plan_step(arena, S, profile, self.ids_dev, self.mask_dev, self.logits_dev, self.staging, self.slot_bytes)
        ctx = self.contexts[profile]
        for name, shape in b.shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise ValueError(f"the engine does not accept {name} of shape {list(shape)}")
        for name, addr in b.addresses.items():
            ctx.set_tensor_address(name, addr)
        if not ctx.execute_async_v3(self.cuda.stream_handle):
            from ...engines import compat
            raise RuntimeError(f"{self.t.label}: execution failed ({compat.last_error(self.t)})")
        for dst, src, n in b.copies:
            self.cuda.copy(dst, src, n, Cuda.D2D)
            arena.bytes_copied += n
        self.cuda.sync()            # host arrays above must outlive their (pageable, staged) copies
        arena.length += S

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, arena: KVArena) -> np.ndarray:
        B, S = check_step(input_ids, attention_mask, arena, self.bundle.vocab_size)
        P = arena.length
        t = time.perf_counter()
        for first, stop, profile in plan_runs(P, S):
            index = self.prefill_profile if profile == "prefill" else self.decode_profile
            self._run(input_ids[:, first:stop], attention_mask[:, :P + stop], arena, index)
        logits = self._logits[:B]
        self.cuda.copy(logits.ctypes.data, self.logits_dev, logits.nbytes, Cuda.D2H)
        self.cuda.sync()
        self._run_s += time.perf_counter() - t
        return logits

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def close(self) -> None:
        """Keep TensorRT-RTX's JIT-compiled kernels for the next start (best effort: the bundle may be read-only)."""
        if getattr(self, "engine", None) is None:
            return
        if self.runtime_cache is not None:
            try:
                from ...engines import compat
                data = compat.serialize_runtime_cache(self.runtime_cache)
                tmp = self.cache_path.with_name(f".{self.cache_path.name}.{os.getpid()}")
                Path(tmp).write_bytes(data)
                os.replace(tmp, self.cache_path)
            except OSError:
                pass
        self.contexts.clear()
        self.engine = None
        self.cuda.close()
