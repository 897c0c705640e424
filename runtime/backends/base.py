"""The backend contract: everything the runtime may ask of a backend, declared here and nowhere else.

    backend = load_backend(bundle, RunOptions(device="cuda"))    # runtime/run_options.py
    arena = backend.new_arena()
    arena.reset(batch)
    logits = backend.step(input_ids, attention_mask, arena)      # a prompt when arena.length == 0
    backend.close()

`step` runs the model on S new tokens per row: their K/V land in arena positions [length, length + S)
and the arena advances by S. It returns `Logits` of each row's last position, [B, vocab] float32: a host
array, or `DeviceLogits` left in device memory (runtime/backends/cuda_graph.py). Read them through
`argmax_rows(logits)` (greedy: on the GPU only the graph's own argmax crosses to the host),
`np.asarray(logits)` (the values), `device_value(logits)` (the device buffer, for a consumer that stays
on the GPU) or `sampled_ids(logits)` (image codes the step drew itself: see `sample` below). `step` is a template method (Polygraphy's `infer` / `infer_impl`): it checks the arguments,
times the call and, when `records` is a list, records it; subclasses implement `_step`.

What a backend can do is declared as attributes, read by the decode primitive (runtime/decode.py):
`prefill_chunk`, `pieces_may_pad`, `features_prefill`; `graph` names the bundle graph its steps run.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..bundle import BundleError
from ..kv_arena import KVArena
from .cuda_graph import DeviceLogits


@dataclass
class StepRecord:
    """One `step` call, for benchmarks: cached positions before it, new tokens per row, wall seconds,
    and seconds inside the graph-execution call (the rest is runtime overhead)."""
    past: int
    new: int
    wall_s: float
    graph_s: float


class Backend(ABC):
    name: str = "?"                      # "ort" or "trt"
    device: str = "cpu"                  # where the steps run: "cpu" or "cuda"
    graph: str = "decode"                # the bundle graph the steps run
    prefill_chunk: int | None = None     # longer prompts are fed in pieces of this many tokens (None: whole)
    pieces_may_pad: bool = True          # a left-padded batch may be fed in pieces (see decode.Rows.prompt)
    features_prefill: bool = False       # prefill_features is available (LlamaGen t2i captions)
    all_positions: bool = False          # step(..., all_positions=True) at batch 1: every new token's logits
    rows_own_lengths: bool = False       # step_rows: each arena row at its own length (continuous batching)
    own_threads: bool = False            # CPU sessions with thread pools of their own (RunOptions.shared_threads)
    sampler_tail: bool = False           # the step graph ends in the image sampler (device_sampler.add_sampler)

    def __init__(self):
        self._run_s = 0.0
        self.kv_bytes_copied = 0         # K/V bytes this backend had to copy outside the graph (audits)
        self.records: list[StepRecord] | None = None

    # -- the contract --------------------------------------------------------------------------------
    @abstractmethod
    def new_arena(self, max_batch: int | None = None, max_seq: int | None = None) -> KVArena:
        """A zeroed KV arena in the layout and memory this backend's graph reads (max_seq: a shorter cache
        than the bundle's, e.g. what a KV budget allows)."""

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, arena: KVArena, all_positions: bool = False,
             sample: dict | None = None):
        """Run S new tokens per row ([B, S] ids, attention mask [B, length + S]); returns Logits [B, vocab]
        of each row's last position or, with all_positions (batch 1, where declared), [S, vocab] of
        every new position (a speculative verify step). sample: the sampler tail's inputs
        (device_sampler.sampler_feeds), where declared (`sampler_tail`): a step replayed as a captured
        graph then also draws each image's code (`sampled_ids(logits)`); other steps ignore it."""
        batch, n_new = check_step(input_ids, attention_mask, arena)
        if all_positions and not (self.all_positions and batch == 1):
            raise ValueError(f"this backend gives every position's logits only at batch 1 on the ONNX Runtime "
                             f"graph (asked at batch {batch}, {self.name}, graph {self.graph})")
        past, graph_before, started = arena.length, self._run_s, time.perf_counter()
        logits = self._step(input_ids, attention_mask, arena, all_positions, sample)
        if self.records is not None:
            self.records.append(StepRecord(past, n_new, time.perf_counter() - started, self._run_s - graph_before))
        return logits

    def step_rows(self, input_ids: np.ndarray, lengths: np.ndarray, arena: KVArena, row: int | None = None):
        """Continuous batching, where declared (rows_own_lengths): every arena row continues at its own
        length. row None: one token for each of the arena's rows ([B, 1]); row r: S tokens of that row
        alone ([1, S]: its prompt, or a piece of it), the other rows untouched. lengths: the rows' cached
        positions before the step ([B], or [1] for one row). Returns Logits [B or 1, vocab]; the arena's
        own length is not used or moved: the caller keeps the rows' lengths (decode.Slots). A template
        method too: checks, timing and `records` here, the step in `_step_rows`."""
        if not self.rows_own_lengths:
            raise BundleError(f"continuous batching needs a graph whose cache keeps each row at its own length "
                              f"(the ONNX Runtime graph; this is {self.name}, graph {self.graph})")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        batch, n_new = ids.shape
        lengths = np.asarray(lengths, dtype=np.int64)
        if row is None and (batch != arena.batch or n_new != 1):
            raise ValueError(f"a step of all rows takes one token for each of the arena's {arena.batch} rows")
        if row is not None and batch != 1:
            raise ValueError("a step of one row takes that row's tokens only ([1, S])")
        if (lengths + n_new).max() > arena.max_seq:
            raise IndexError(f"{int((lengths + n_new).max())} positions exceed the cache's max_seq {arena.max_seq}")
        started, graph_before = time.perf_counter(), self._run_s
        logits = self._step_rows(ids, lengths, arena, row)
        if self.records is not None:
            self.records.append(StepRecord(int(lengths.max()), n_new, time.perf_counter() - started,
                                           self._run_s - graph_before))
        return logits

    def prefill_features(self, features: np.ndarray, attention_mask: np.ndarray, arena: KVArena):
        """The prefill graph on input features [B, S, dim] into an empty arena; logits as `step`'s."""
        raise BundleError(f"caption-conditioned (LlamaGen t2i) prefill runs on the ort backend only "
                          f"(this is {self.name})")

    def run_seconds(self) -> float:
        """Seconds spent inside the graph-execution call so far (benchmarks split overhead from it)."""
        return self._run_s

    def device_memory_bytes(self) -> int | None:
        """Device memory this backend holds (None where it cannot tell)."""
        return None

    def close(self) -> None:
        """Free sessions, engines, captured graphs and device buffers; the backend is unusable after."""

    # -- what subclasses implement -------------------------------------------------------------------
    def _step_rows(self, input_ids: np.ndarray, lengths: np.ndarray, arena: KVArena, row: int | None):
        """The rows' step itself (arguments already checked), where rows_own_lengths is declared."""
        raise NotImplementedError

    @abstractmethod
    def _step(self, input_ids: np.ndarray, attention_mask: np.ndarray, arena: KVArena, all_positions: bool,
              sample: dict | None = None):
        """The step itself (arguments already checked); advances the arena."""


def argmax_rows(logits) -> np.ndarray:
    """Each row's most likely token (the first on ties): on the GPU the graph's own argmax, the only
    thing a greedy step copies to the host."""
    if isinstance(logits, DeviceLogits):
        return logits.argmax_rows()
    return np.argmax(logits, axis=-1)


def device_value(logits):
    """The OrtValue [rows, vocab] behind logits left in device memory, or None for host logits."""
    return logits.ortvalue() if isinstance(logits, DeviceLogits) else None


def sampled_ids(logits) -> np.ndarray | None:
    """The codes [images] a step drew with its sampler tail, on the host; None when it drew none."""
    return logits.sampled_ids() if isinstance(logits, DeviceLogits) else None


def check_step(inputs: np.ndarray, attention_mask: np.ndarray, arena: KVArena) -> tuple[int, int]:
    """Shared argument checks of `inputs` [B, S] token ids (or [B, S, dim] features); returns (B, S)."""
    B, S = inputs.shape[:2]
    if B != arena.batch:
        raise ValueError(f"input batch {B} does not match the arena's batch {arena.batch}")
    if attention_mask.shape != (B, arena.length + S):
        raise ValueError(f"attention_mask must be [{B}, {arena.length + S}], got {list(attention_mask.shape)}")
    if arena.length + S > arena.max_seq:
        raise IndexError(f"{arena.length + S} positions exceed the cache's max_seq {arena.max_seq}")
    return B, S
