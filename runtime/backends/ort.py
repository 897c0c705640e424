"""ONNX Runtime backend: IOBinding with addresses into the KV arena, so no KV byte is copied.

Weights are held once: one session, on the decode graph, runs both phases. With an empty past
(P = 0) the decode graph computes exactly what the prefill graph computes (bit-identical, tested),
so the prompt goes through it too. That leaves ONNX Runtime free to pre-pack the MatMul weights
(its faster kernel layout: measured 3x faster at batch 2 and about 20 % faster at batch 1 on
SmolLM2) without a second packed copy for a second session.

`prepack=False` trades that speed for memory: the backend then maps weights.bin once and hands the
session read-only views of it (`add_initializer`), so no private copy exists at all.
"""
from __future__ import annotations

import time

import numpy as np

from ..bundle import Bundle, BundleError
from ..kv_arena import KVArena
from .base import check_step


def _providers(device: str):
    import onnxruntime as ort
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BundleError("device 'cuda' needs onnxruntime-gpu (pip install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"unknown device {device!r} (cpu or cuda)")


class SharedWeights:
    """One read-only mapping of weights.bin, viewed as the OrtValues the graphs' initializers name."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.file = np.memmap(bundle.weights_path, dtype=np.uint8, mode="r")
        self.values: dict = {}

    def add_to(self, options, graph_path) -> None:
        import onnx
        import onnxruntime as ort
        from onnx.helper import tensor_dtype_to_np_dtype
        model = onnx.load(str(graph_path), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            if t.name not in self.values:
                where = {e.key: e.value for e in t.external_data}
                start, length = int(where.get("offset", 0)), int(where["length"])
                raw = self.file[start: start + length]
                array = raw.view(tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))
                self.values[t.name] = ort.OrtValue.ortvalue_from_numpy(array)
            options.add_initializer(t.name, self.values[t.name])


class OrtBackend:
    name = "ort"

    def __init__(self, bundle: Bundle, threads: int | None = None, device: str = "cpu", prepack: bool = True,
                 graphs=("decode",), audit: bool = False, prefill_chunk: int | None = 256):
        """audit: after each step, check that every present.* output was written at the arena address
        it was bound to, and count the bytes of any that were not (benchmarks and tests).
        prefill_chunk: the Generator feeds longer prompts in pieces of this many tokens (bounds the
        activation memory ONNX Runtime keeps; None: whole prompts)."""
        self.prefill_chunk = prefill_chunk
        self._c_device = None
        self.bundle, self.device, self.audit = bundle, device, audit
        self.threads, self.prepack = threads, prepack
        self._providers = _providers(device)
        # Host weights are shared through one mapping; a CUDA session copies them to the device anyway.
        self.weights = SharedWeights(bundle) if device == "cpu" and not prepack else None
        self.sessions = {}
        for kind in graphs:
            self.session(kind)
        self._logits = np.zeros((bundle.max_batch, bundle.vocab_size), np.float32)
        self._run_s = 0.0

    def session(self, kind: str):
        """Sessions are created on first use (the score graph only when evaluating)."""
        if kind not in self.sessions:
            import onnxruntime as ort
            path = self.bundle.graph_path(kind)
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.threads:
                so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            if not self.prepack:
                so.add_session_config_entry("session.disable_prepacking", "1")
            try:
                if self.weights is not None:
                    self.weights.add_to(so, path)
                self.sessions[kind] = ort.InferenceSession(str(path), so, providers=self._providers)
            except Exception as e:
                raise BundleError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        return self.sessions[kind]

    def new_arena(self, max_batch: int | None = None) -> KVArena:
        b = self.bundle
        n_kv, hd = b.kv_shape
        allocate = None
        if self.device == "cuda":
            import onnxruntime as ort

            def allocate(count, dtype):
                value = ort.OrtValue.ortvalue_from_shape_and_type([count], dtype, "cuda", 0)
                return value, value.data_ptr()
        return KVArena(b.n_layers, b.max_seq, max_batch or b.max_batch, n_kv, hd, b.kv_dtype, allocate)

    def run_seconds(self) -> float:
        return self._run_s

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, arena: KVArena) -> np.ndarray:
        B, S = check_step(input_ids, attention_mask, arena, self.bundle.vocab_size)
        P = arena.length
        sess = self.session("decode")          # P = 0: the prompt, with an empty past
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        dt = arena.dtype
        logits = self._logits[:B]
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        bound = [logits.ctypes.data]
        bind_in, bind_out = self._binders(io)
        for i in range(self.bundle.n_layers):
            for kv, name in ((0, "key"), (1, "value")):
                ptr, shape = arena.region(i, kv, 0, P)
                bind_in(f"past.{i}.{name}", dt, shape, ptr)
                ptr, shape = arena.region(i, kv, P, P + S)
                bind_out(f"present.{i}.{name}", dt, shape, ptr)
                bound.append(ptr)
        t = time.perf_counter()
        sess.run_with_iobinding(io)
        self._run_s += time.perf_counter() - t
        if self.audit:
            # Outputs come back in binding order; any not at its bound address was copied.
            for value, ptr in zip(io.get_outputs()[1:], bound[1:]):
                if value.data_ptr() != ptr:
                    arena.bytes_copied += int(np.prod(value.shape())) * dt.itemsize
        arena.length = P + S
        return logits

    def _binders(self, io):
        """bind(name, dtype, shape, pointer) for inputs and outputs on this backend's device.
        ONNX Runtime's Python wrapper builds a new device object on every call, which was half of
        the runtime's per-step overhead (2 binds per layer); where its binding object exposes the
        underlying calls, bind through them with one device object made once."""
        raw = getattr(io, "_iobinding", None)
        if self._c_device is None:
            import onnxruntime as ort
            try:
                self._c_device = ort.OrtDevice.make(self.device, 0)._get_c_device()
            except (AttributeError, TypeError):
                self._c_device = False
        if raw is not None and self._c_device is not False:
            dev = self._c_device
            return (lambda n, dt, shape, ptr: raw.bind_input(n, dev, dt, shape, ptr),
                    lambda n, dt, shape, ptr: raw.bind_output(n, dev, dt, shape, ptr))
        return (lambda n, dt, shape, ptr: io.bind_input(n, self.device, 0, dt, shape, ptr),
                lambda n, dt, shape, ptr: io.bind_output(n, self.device, 0, dt, shape, ptr))
