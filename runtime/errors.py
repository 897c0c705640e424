"""The error the engine commands raise for bad input or an impossible build (one line, exit status 2)."""
from __future__ import annotations


class EngineError(ValueError):
    """Something the user can fix: a missing TensorRT, a bundle of the wrong precision, a bad option."""
