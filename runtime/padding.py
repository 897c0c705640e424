"""Left padding: rows of different lengths in one batch, each ending at the last position.

Generation reads the logits of every row's last position, so every row must end there; the
attention mask (0 on padding) keeps the model from seeing what was put in front.
"""
from __future__ import annotations

import numpy as np


def left_pad(rows, fill=0, length: int | None = None, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(values [B, length, ...], attention mask [B, length] int64) for `rows`, each a sequence of
    tokens (or of feature vectors) at most `length` long (default: the longest row)."""
    length = max(len(row) for row in rows) if length is None else length
    item_shape = np.shape(rows[0])[1:]
    values = np.full((len(rows), length, *item_shape), fill, dtype)
    mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        start = length - len(row)
        values[i, start:] = row
        mask[i, start:] = 1
    return values, mask
