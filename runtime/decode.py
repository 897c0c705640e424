"""The decode primitive: the rows of one batch in a KV arena, and the one place generation runs the model.

    rows = Rows(backend, arena)
    logits = rows.start(prompts, pad)            # a new batch: each row's prompt, left-padded to one length
    while ...:
        tokens = sample(logits)
        logits = rows.feed(tokens[:, None])      # one step: S new tokens per row ([B, S])
    rows.rollback(n)                             # drop the last n positions (rejected speculative tokens)

Text generation and chat (runtime/generator.py), image tokens with their conditional and unconditional
rows (runtime/image.py) and `ardeploy verify` (export/verify.py) all drive the model through a `Rows`;
nothing else calls `backend.step`. Rows keeps the batch's attention mask (what every row may see) and
applies the backend's declared prompt rule: long prompts go in pieces of `prefill_chunk` tokens, except a
left-padded batch on a graph that keeps rows at their own lengths (`pieces_may_pad` False).

How the next features use it (docs/ARCHITECTURE.md has the longer sketch):
- speculative decoding (runtime/speculative.py): `verify` k+1 tokens of a row (the last sampled one and
  k drafted ones) in one step that gives every position's logits, accept a prefix, `rollback` the rest:
  the row's length moves back, no cache byte is copied;
- continuous batching (runtime/batching.py): requests join and leave a running batch between steps;
  `Slots` keeps each arena row at its own length on a graph whose cache holds rows at their own lengths
  (backend.step_rows): a prompt goes into a free row alone, then every step runs all rows at once.
"""
from __future__ import annotations

import numpy as np

from .kv_arena import KVArena
from .padding import left_pad


class Rows:
    def __init__(self, backend, arena: KVArena):
        self.backend, self.arena = backend, arena
        self.mask: np.ndarray | None = None       # [B, length]: 1 where a row sees the position
        self.logits = None                        # the last step's logits (backends/base.py: Logits)

    @property
    def n_rows(self) -> int:
        return self.arena.batch

    def start(self, prompts: list[list[int]], pad: int):
        """A new batch in the arena: each row's prompt, left-padded to one length. Returns the logits of
        each row's last position."""
        self.arena.reset(len(prompts))
        ids, mask = left_pad(prompts, fill=pad)
        return self.prompt(ids, mask)

    def start_features(self, features: np.ndarray, mask: np.ndarray):
        """A new batch whose prompts are input features [B, S, dim] (LlamaGen t2i captions)."""
        self.arena.reset(len(features))
        self.mask = mask
        return self._took(self.backend.prefill_features(features, mask, self.arena))

    def resume(self, ids: list[int], cached: list[int]):
        """One row (chat): keep the arena's K/V of the longest common prefix of `ids` and `cached` (the
        tokens it holds) and run the rest; the last token always runs again, its logits are needed."""
        keep, limit = 0, min(len(ids) - 1, len(cached))
        while keep < limit and ids[keep] == cached[keep]:
            keep += 1
        self.arena.truncate(keep)
        return self.prompt(np.asarray([ids[keep:]], dtype=np.int64), np.ones((1, len(ids)), dtype=np.int64))

    def prompt(self, ids: np.ndarray, mask: np.ndarray):
        """Run prompt tokens [B, S] after what the arena holds (`mask` covers both); long prompts go in
        pieces of the backend's prefill_chunk, each attending to the ones before it through the arena:
        ONNX Runtime keeps its largest activation buffers for good, and a 1536-token prompt in one piece
        would leave the process 40 % larger for the rest of its life."""
        backend = self.backend
        chunk, n_new = backend.prefill_chunk, ids.shape[1]
        self.mask = mask
        # A graph that keeps rows at their own lengths takes a padded batch in one piece (ort.gqa_inputs).
        padded = not backend.pieces_may_pad and not mask.all()
        if not chunk or n_new <= chunk or padded:
            return self._took(backend.step(ids, mask, self.arena))
        past = mask.shape[1] - n_new
        for start in range(0, n_new, chunk):
            stop = min(n_new, start + chunk)
            logits = backend.step(ids[:, start:stop], mask[:, :past + stop], self.arena)
        return self._took(logits)

    def feed(self, ids: np.ndarray, visible: np.ndarray | None = None, sample: dict | None = None):
        """One decode step: new tokens [B, S] per row; `visible` [B, S] (default all 1) is 0 where a row
        must not see a token (padding fed to a row that waits); `sample`: the sampler tail's inputs (see
        backends/base.py). Returns the logits."""
        visible = np.ones_like(ids, dtype=np.int64) if visible is None else visible.astype(np.int64)
        self.mask = np.concatenate([self.mask, visible], axis=1)
        return self._took(self.backend.step(ids, self.mask, self.arena, sample=sample))

    def verify(self, ids: list[int]):
        """A speculative verify step of one row: the last sampled token and the drafted ones, run at once;
        returns every position's logits [S, vocab] (position i: the distribution after ids[i]). A backend
        that gives only the last position's logits runs them one at a time (same result, no speed-up)."""
        ids = np.asarray([ids], dtype=np.int64)
        if self.backend.all_positions:
            self.mask = np.concatenate([self.mask, np.ones_like(ids)], axis=1)
            return self._took(self.backend.step(ids, self.mask, self.arena, all_positions=True))
        rows = [np.array(self.feed(ids[:, i:i + 1]), np.float32)[0] for i in range(ids.shape[1])]
        return self._took(np.stack(rows))

    def rollback(self, n: int) -> None:
        """Drop the last n positions of every row (their K/V stay in memory and are overwritten next)."""
        if n:
            self.arena.truncate(self.arena.length - n)
            self.mask = self.mask[:, :self.mask.shape[1] - n]

    def _took(self, logits):
        self.logits = logits
        return logits


class Slots:
    """The arena's rows as slots for continuous batching: each holds one request at its own length. A
    request's prompt runs into the lowest free row alone (in pieces of the backend's prefill_chunk),
    leaving the other rows as they are; `step` then runs one token for each of the rows up to the last
    busy one at once (a batch-major cache's first rows are a smaller batch's cache, so a lone request
    runs at batch 1; a free row among them is fed padding at its start, overwritten when it is taken)."""

    def __init__(self, backend, arena: KVArena, pad: int):
        if not backend.rows_own_lengths:
            backend.step_rows(np.zeros((1, 1), np.int64), np.zeros(1, np.int64), arena, row=0)   # raises, says why
        self.backend, self.arena, self.pad = backend, arena, pad
        arena.reset(arena.max_batch)
        self.lengths = np.zeros(arena.max_batch, np.int64)
        self.busy = np.zeros(arena.max_batch, bool)

    @property
    def free(self) -> list[int]:
        return [int(row) for row in np.nonzero(~self.busy)[0]]

    def admit(self, prompt: list[int]) -> tuple[int, object]:
        """Run a prompt into a free row; returns (row, logits [1, vocab] of its last position)."""
        row = self.free[0]
        self.busy[row], self.lengths[row] = True, 0
        self.arena.reset(self.arena.max_batch)                  # any row may be bound
        ids = np.asarray([prompt], dtype=np.int64)
        chunk = self.backend.prefill_chunk or ids.shape[1]
        for start in range(0, ids.shape[1], chunk):
            piece = ids[:, start:start + chunk]
            logits = self.backend.step_rows(piece, self.lengths[row:row + 1], self.arena, row=row)
            self.lengths[row] += piece.shape[1]
        return row, logits

    def step(self, tokens: np.ndarray):
        """One token for every busy row (tokens [max_batch]; free rows' entries are ignored). Returns the
        logits of rows 0 .. the last busy one."""
        rows = int(np.nonzero(self.busy)[0].max()) + 1
        busy = self.busy[:rows]
        ids = np.where(busy, tokens[:rows], self.pad).astype(np.int64)[:, None]
        lengths = np.where(busy, self.lengths[:rows], 0)
        self.arena.reset(rows)                                  # the cache's first `rows` rows
        logits = self.backend.step_rows(ids, lengths, self.arena)
        self.lengths[:rows][busy] += 1
        return logits

    def release(self, row: int) -> None:
        self.busy[row], self.lengths[row] = False, 0
