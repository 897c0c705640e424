"""The backend interface: load graphs, bind inputs/outputs (KV by address into the arena), run.

    backend = OrtBackend(bundle)             # or TrtBackend(bundle)
    arena = backend.new_arena()
    arena.reset(batch)
    logits = backend.step(input_ids, attention_mask, arena)   # prefill when arena.length == 0

`step` runs the prefill graph on an empty arena and the decode graph otherwise; either way the
new tokens' K/V land in arena positions [length, length + S) and the backend advances the arena
by S (`arena.advance`). `logits` is a float32 host array [B, vocab] for the last position.

`prefill_features` (optional: LlamaGen t2i bundles, ONNX Runtime only for now) is the prefill of a
prompt given as input features [B, S, dim] (`caption_features`) instead of token ids.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from ..kv_arena import KVArena


class Backend(Protocol):
    name: str

    def new_arena(self, max_batch: int | None = None) -> KVArena: ...

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, arena: KVArena) -> np.ndarray: ...

    def prefill_features(self, features: np.ndarray, attention_mask: np.ndarray, arena: KVArena) -> np.ndarray:
        """Optional: the prefill graph on features [B, S, dim] into an empty arena; logits as `step`'s."""
        ...

    def run_seconds(self) -> float:
        """Seconds spent inside the graph-execution call so far (benchmarks split overhead from it)."""
        ...


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
