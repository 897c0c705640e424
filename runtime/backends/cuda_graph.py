"""The decode step on an NVIDIA GPU as one captured CUDA graph (ONNX Runtime's `enable_cuda_graph`).

A CUDA graph replays the kernels of one recorded run with the same addresses and shapes, so each
step costs one launch instead of one per kernel (a small model's step on a big GPU is the sum of its
launches). ONNX Runtime records a run when its CUDA provider was made with `enable_cuda_graph` and
the run names a graph id (run option `gpu_graph_id`; -1 runs without recording), and replays that
graph on every later run with the same id. What must stay fixed, and how the ONNX Runtime graph
(export/ort_graph.py) keeps it fixed:

- every input and output lives at one device address: the token ids, per-row lengths and last-token
  indices are small device buffers written before each replay (`update_inplace`), the logits land
  in one device buffer, and the cache is the arena's own buffers, bound as both past and present;
- every shape: a step is one token per row for a given batch size (one graph per batch size and
  arena), and `total_seq_len` is the arena's max_seq rather than the longest row (GroupQueryAttention
  reads each row's length from `seqlens_k`; the cache buffer is max_seq long anyway).

Prompts (several tokens per row) run without a graph; only the one-token step is replayed.

ONNX Runtime's CUDA provider waits for the stream at the end of every replay (its CUDA graph manager's
Replay; we found no run option that skips it), so what the host does between two steps (write the next
inputs, read the tokens) adds to each step: a loop that queues step n+1 while step n runs, as a torch loop
does, is out of reach this way.
"""
from __future__ import annotations

import numpy as np

from ..kv_arena import KVArena
from ..sessions import graph_run_options


class DeviceLogits:
    """A step's logits [B, vocab] left in device memory until someone needs them. `np.asarray(x)`,
    `x.copy()` and indexing bring them to the host (once); a greedy sampler reads only `argmax_rows()`,
    the graph's own argmax (B int64 values): the one copy a greedy step needs. Valid until the next step
    (the buffers are the backend's, as the host logits buffer is on the CPU)."""

    def __init__(self, logits, next_token=None, sampled=None):
        self._logits, self._next_token, self._sampled, self._host = logits, next_token, sampled, None
        self.shape = tuple(logits.shape())

    def host(self) -> np.ndarray:
        if self._host is None:
            self._host = self._logits.numpy()
        return self._host

    def __array__(self, dtype=None, copy=None):
        return self.host() if dtype is None else self.host().astype(dtype)

    def __getitem__(self, key):
        return self.host()[key]

    def __len__(self) -> int:
        return self.shape[0]

    def copy(self) -> np.ndarray:
        return self.host().copy()

    def ortvalue(self):
        """The device OrtValue itself, for a consumer that stays on the GPU (the image device sampler)."""
        return self._logits

    def argmax_rows(self) -> np.ndarray:
        """Each row's most likely token (the first on ties, as np.argmax)."""
        if self._next_token is None:
            return np.argmax(self.host(), axis=-1)
        return self._next_token.numpy()

    def sampled_ids(self) -> np.ndarray | None:
        """The codes [images] the step's sampler tail drew (None: the step was given no sample)."""
        return None if self._sampled is None else self._sampled.numpy()


class CapturedStep:
    """The step of `width` tokens per row (1: decoding; more: a batch of one's speculative verify step,
    with every position's logits) at batch `batch` over `arena`, bound once at fixed device addresses
    and replayed as CUDA graph `graph_id` (recorded by ONNX Runtime on its first run)."""

    def __init__(self, session, arena: KVArena, batch: int, vocab_size: int, graph_id: int, bind_cache,
                 device: str = "cuda", next_token: bool = True, width: int = 1, extra: "FixedInputs | None" = None):
        """bind_cache(io) binds every past.* input and present.* output to the arena's buffers and
        returns the present addresses (the backend's own binder, so both paths bind alike).
        device "cpu" runs the same bindings without a CUDA graph (how the tests exercise this path).
        extra: more inputs and an output of the graph (the image sampler appended to it,
        device_sampler.py), bound at their fixed buffers too."""
        import onnxruntime as ort

        def on_device(array):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, 0)

        self.session, self.arena, self.batch, self.graph_id = session, arena, batch, graph_id
        n_out = batch * width                   # width 1: row r's token is r; a verify step: every token
        self.input_ids = on_device(np.zeros((batch, width), np.int64))
        self.seqlens_k = on_device(np.zeros(batch, np.int32))
        self.last_token = on_device(np.arange(n_out, dtype=np.int64))
        self.total_seq_len = np.array(arena.max_seq, np.int32)           # a host input, fixed (see above)
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([n_out, vocab_size], np.float32, device, 0)
        io = session.io_binding()
        io.bind_ortvalue_output("logits", self.logits)
        self.present = bind_cache(io)
        io.bind_ortvalue_input("input_ids", self.input_ids)
        io.bind_ortvalue_input("seqlens_k", self.seqlens_k)
        io.bind_ortvalue_input("last_token", self.last_token)
        io.bind_cpu_input("total_seq_len", self.total_seq_len)
        self.next_token = None
        if next_token:          # bound after the present.* outputs, which come right after logits, in order
            self.next_token = ort.OrtValue.ortvalue_from_shape_and_type([n_out], np.int64, device, 0)
            io.bind_ortvalue_output("next_token", self.next_token)
        self.extra = extra
        if extra is not None:
            extra.bind(io)
        self.io, self.options = io, graph_run_options(graph_id)
        self.runs = 0

    def run(self, input_ids: np.ndarray, seqlens_k: np.ndarray, extra: dict | None = None) -> DeviceLogits:
        """One step: new token ids [B, width] and each row's length - 1 in; the logits stay on the device.
        extra: this step's values of the extra inputs (the extra output comes back with the logits); None:
        the extra nodes run on what their buffers hold and nothing is read from them."""
        self.input_ids.update_inplace(np.ascontiguousarray(input_ids, dtype=np.int64))
        self.seqlens_k.update_inplace(np.ascontiguousarray(seqlens_k, dtype=np.int32))
        if extra is not None:
            self.extra.update(extra)
        self.session.run_with_iobinding(self.io, self.options)
        return DeviceLogits(self.logits, self.next_token, None if extra is None else self.extra.output)


class FixedInputs:
    """Named inputs of a captured graph at fixed device addresses, and one output (name, shape, dtype)
    likewise; inputs named in `host` are bound from the host as given first (a captured graph keeps the
    values it recorded: its key must include them). `update` copies only the values that changed since
    the last step: each host-to-device copy is a good part of a small step's overhead."""

    def __init__(self, values: dict, device: str, host: tuple = (), output: tuple | None = None):
        import onnxruntime as ort

        def zeros(shape, dtype):
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), device, 0)
        self.host = {name: values[name] for name in host}
        self.buffers = {name: zeros(value.shape, value.dtype) for name, value in values.items() if name not in host}
        self.output_name, self.output = (output[0], zeros(output[1], output[2])) if output else (None, None)
        self.last: dict = {}
        self.update(values)

    def update(self, values: dict) -> None:
        for name, buffer in self.buffers.items():
            value = values[name]
            last = self.last.get(name)
            if last is value:
                continue
            if last is None or not np.array_equal(last, value):
                buffer.update_inplace(np.ascontiguousarray(value))
            self.last[name] = value     # equal or copied: the next step with this array skips it at a glance

    def bind(self, io) -> None:
        for name, buffer in self.buffers.items():
            io.bind_ortvalue_input(name, buffer)
        for name, value in self.host.items():
            io.bind_cpu_input(name, value)
        if self.output is not None:
            io.bind_ortvalue_output(self.output_name, self.output)
