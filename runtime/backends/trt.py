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
and K/V, independent of P, counted in `kv_bytes_copied`.

The arithmetic (which address and shape each tensor gets) is `step_binding`, a pure function tested
without a GPU. Device memory and copies go through runtime/cuda.py (cuda-python, imported lazily).
No torch here.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import engine_record
from .. import trt_compat as compat
from ..bundle import Bundle, BundleError
from ..cuda import Cuda, DeviceArray, query_gpu
from ..kv_arena import KVArena
from .base import Backend
from ..errors import UserError

ALIGN = 256
RUNTIME_CACHE = "runtime.cache"     # TensorRT-RTX's JIT-compiled kernels, kept beside the plan


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


def engine_runs(past: int, seq: int) -> list[tuple[int, int, str]]:
    """How one `step` of `seq` tokens after `past` cached ones maps onto engine runs: (first, stop, profile name).

    An empty cache: one prefill run. Otherwise one decode run per token, because the decode profile
    is tuned for (and, to keep the weights once, limited to) one or two new tokens.
    """
    if past == 0:
        return [(0, seq, engine_record.PREFILL)]
    return [(j, j + 1, engine_record.DECODE) for j in range(seq)]


def step_binding(arena: KVArena, seq: int, profile: int, ids_addr: int, mask_addr: int, logits_addr: int,
                 staging_base: int, slot_bytes: int) -> StepBinding:
    """Shapes and addresses for one engine run of `seq` new tokens after the arena's `length` cached ones.

    past.{i}.{k,v}     arena [0, P)           (P = 0: empty, bound to the base address)
    present.{i}.{k,v}  arena [P, P + seq)     or staging slot 2*i+kv when that address is not aligned
    """
    P, B = arena.length, arena.batch
    binding = StepBinding(profile)
    binding.shapes["input_ids"] = (B, seq)
    binding.shapes["attention_mask"] = (B, P + seq)
    binding.addresses.update({"input_ids": ids_addr, "attention_mask": mask_addr, "logits": logits_addr})
    nbytes = seq * arena.row_bytes
    for i in range(arena.n_layers):
        for kv, name in ((0, "key"), (1, "value")):
            addr, shape = arena.region(i, kv, 0, P)
            if addr % ALIGN:
                raise ValueError(f"KV arena buffer of layer {i} is not {ALIGN}-byte aligned")
            binding.shapes[f"past.{i}.{name}"] = tuple(shape)
            binding.addresses[f"past.{i}.{name}"] = addr
            dst, _ = arena.region(i, kv, P, P + seq)
            if dst % ALIGN == 0:
                binding.addresses[f"present.{i}.{name}"] = dst
            else:
                if nbytes > slot_bytes:
                    raise ValueError(f"{seq} unaligned rows ({nbytes} B) exceed the staging slot ({slot_bytes} B)")
                src = staging_base + (2 * i + kv) * slot_bytes
                binding.addresses[f"present.{i}.{name}"] = src
                binding.copies.append((dst, src, nbytes))
    return binding


# -- the backend -----------------------------------------------------------------------------------------
class TrtBackend(Backend):
    name = "trt"
    device = "cuda"

    def __init__(self, bundle: Bundle, gpu: int = 0, cuda_graph: bool = False, runtime_cache: bool = True,
                 verbose: bool = False):
        """gpu: which GPU; cuda_graph: let TensorRT capture its runs (the engines' own CUDA graphs)."""
        super().__init__()
        self.bundle = bundle
        self.record = engine_record.load(bundle)
        engine_record.check_graphs(self.record, bundle)
        self.tensorrt = compat.load(self.record["tensorrt"]["flavour"])
        engine_record.check_tensorrt(self.record, self.tensorrt.flavour, self.tensorrt.version)
        self.cuda = Cuda(gpu)
        name_and_cc = query_gpu(gpu)
        engine_record.check_gpu(self.record, *name_and_cc)
        entry = self.record["engines"][0]
        self.engine = self._load_engine(engine_record.engines_dir(bundle) / entry["file"], name_and_cc, verbose)
        profile_names = [p["name"] for p in entry["profiles"]]
        self.prefill_profile = profile_names.index(engine_record.PREFILL)
        self.decode_profile = profile_names.index(engine_record.DECODE)
        self.cache_path = engine_record.engines_dir(bundle) / RUNTIME_CACHE
        self._create_contexts(len(profile_names), runtime_cache, cuda_graph)
        self._allocate_io(self.record["max_seq"], self.record["max_batch"])
        self.cuda.sync()

    def _load_engine(self, path: Path, gpu: tuple[str, str], verbose: bool):
        """Deserialize the plan, refusing one this GPU cannot run or whose I/O is not the decode graph's."""
        tensorrt = self.tensorrt
        plan = path.read_bytes()
        self._trt_runtime = compat.runtime(tensorrt, compat.logger(tensorrt, verbose))
        why = compat.engine_validity(tensorrt, self._trt_runtime, plan)
        if why is not None:
            raise BundleError(f"{path}: {tensorrt.label} cannot run this engine on {gpu[0]} ({gpu[1]}): {why}")
        engine = compat.deserialize(tensorrt, self._trt_runtime, plan)
        if engine is None:
            raise BundleError(f"{path}: {tensorrt.label} could not load it ({compat.last_error(tensorrt)})")
        names = {x["name"] for x in compat.engine_io(tensorrt, engine)}
        graph = self.bundle.graph(engine_record.GRAPH).raw
        want = {x["name"] for x in graph["inputs"] + graph["outputs"]}
        if names != want:
            raise BundleError(f"{path}: engine I/O {sorted(names ^ want)} differ from the decode graph's")
        return engine

    def _create_contexts(self, n_profiles: int, runtime_cache: bool, cuda_graph: bool) -> None:
        """One execution context per profile; they share one scratch buffer (they never run at once)."""
        tensorrt = self.tensorrt
        cache_bytes = self.cache_path.read_bytes() if (runtime_cache and self.cache_path.exists()) else None
        self.runtime_cache = compat.new_runtime_cache(tensorrt, self.engine, cache_bytes) if runtime_cache else None
        scratch_bytes = max(compat.profile_memory(tensorrt, self.engine, i) for i in range(n_profiles))
        self.scratch = self.cuda.malloc(scratch_bytes)
        self.contexts = []
        for i in range(n_profiles):
            ctx = compat.create_context(tensorrt, self.engine, i, self.scratch, scratch_bytes, self.cuda.stream_handle,
                                        self.runtime_cache, cuda_graph)
            if ctx is None:
                raise BundleError(f"{tensorrt.label} could not create an execution context "
                                  f"({compat.last_error(tensorrt)})")
            self.contexts.append(ctx)

    def _allocate_io(self, max_seq: int, max_batch: int) -> None:
        """Device buffers for token ids, mask, logits and the staging slots (one row per layer and K/V)."""
        bundle = self.bundle
        self.max_seq, self.max_batch = max_seq, max_batch
        n_kv, hd = bundle.kv_shape
        self.slot_bytes = staging_slot_bytes(max_batch, n_kv, hd, bundle.kv_dtype.itemsize)
        self.staging = self.cuda.malloc(2 * bundle.n_layers * self.slot_bytes)
        self.ids_dev = self.cuda.malloc(max_batch * max_seq * 8)
        self.mask_dev = self.cuda.malloc(max_batch * (max_seq + 1) * 8)
        self.logits_dev = self.cuda.malloc(max_batch * bundle.vocab_size * 4)
        self._logits = np.zeros((max_batch, bundle.vocab_size), np.float32)

    def new_arena(self, max_batch: int | None = None, max_seq: int | None = None) -> KVArena:
        bundle = self.bundle
        if max_seq is not None and max_seq != self.max_seq:
            raise UserError("a KV budget sizes ONNX Runtime's cache; TensorRT engines keep the max_seq they were "
                            "built for (rebuild them with a smaller one)")
        if max_batch is not None and max_batch > self.max_batch:
            raise UserError(f"the engines were built for batch up to {self.max_batch} (asked for {max_batch})")
        n_kv, hd = bundle.kv_shape

        def allocate(count, dtype):
            nbytes = count * np.dtype(dtype).itemsize
            ptr = self.cuda.malloc(nbytes)
            self.cuda.zero(ptr, nbytes)        # a cache starts zeroed (see OrtBackend.new_arena)
            return DeviceArray(ptr, nbytes), ptr
        return KVArena(bundle.n_layers, self.max_seq, max_batch or self.max_batch, n_kv, hd, bundle.kv_dtype, allocate)

    def _run(self, ids: np.ndarray, mask: np.ndarray, arena: KVArena, profile: int) -> None:
        """One engine run in one profile: its new K/V land at the arena's end, which then advances."""
        B, S = ids.shape
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        mask = np.ascontiguousarray(mask, dtype=np.int64)
        self.cuda.copy(self.ids_dev, ids.ctypes.data, ids.nbytes, Cuda.H2D)
        self.cuda.copy(self.mask_dev, mask.ctypes.data, mask.nbytes, Cuda.H2D)
        binding = step_binding(arena, S, profile, self.ids_dev, self.mask_dev, self.logits_dev, self.staging,
                               self.slot_bytes)
        ctx = self.contexts[profile]
        for name, shape in binding.shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise UserError(f"the engine does not accept {name} of shape {list(shape)}")
        for name, addr in binding.addresses.items():
            ctx.set_tensor_address(name, addr)
        if not ctx.execute_async_v3(self.cuda.stream_handle):
            raise RuntimeError(f"{self.tensorrt.label}: execution failed ({compat.last_error(self.tensorrt)})")
        for dst, src, n in binding.copies:
            self.cuda.copy(dst, src, n, Cuda.D2D)
            self.kv_bytes_copied += n
        self.cuda.sync()            # host arrays above must outlive their (pageable, staged) copies
        arena.advance(S)

    def _step(self, input_ids: np.ndarray, attention_mask: np.ndarray, arena: KVArena,
              all_positions: bool = False, sample: dict | None = None) -> np.ndarray:
        B, S = input_ids.shape
        P = arena.length
        started = time.perf_counter()
        for first, stop, profile_name in engine_runs(P, S):
            profile = self.prefill_profile if profile_name == engine_record.PREFILL else self.decode_profile
            self._run(input_ids[:, first:stop], attention_mask[:, :P + stop], arena, profile)
        logits = self._logits[:B]
        self.cuda.copy(logits.ctypes.data, self.logits_dev, logits.nbytes, Cuda.D2H)
        self.cuda.sync()
        self._run_s += time.perf_counter() - started
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
                data = compat.serialize_runtime_cache(self.runtime_cache)
                tmp = self.cache_path.with_name(f".{self.cache_path.name}.{os.getpid()}")
                Path(tmp).write_bytes(data)
                os.replace(tmp, self.cache_path)
            except OSError:
                pass
        self.contexts.clear()
        self.engine = None
        self.cuda.close()
