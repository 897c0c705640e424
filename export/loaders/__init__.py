"""Pick the loader from what PATH is: a .gguf file, a Meta folder (params.json) or a Hugging Face folder."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint, CheckpointError


def load_checkpoint(path: str | Path, family: str | None = None, **family_options) -> Checkpoint:
    """family: force a family whose checkpoints cannot be recognised from the files alone
    (e.g. "llamagen-c2i" for a bare .pt state dict); family_options go to that family's loader."""
    path = Path(path)
    if family not in (None, "auto"):
        raise CheckpointError(f"unknown --family {family!r}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".gguf":
            from .gguf_file import load_gguf
            return load_gguf(path)
        raise CheckpointError(f"{path}: expected a .gguf file or a checkpoint folder")
    if (path / "params.json").exists():
        from .meta import load_meta
        return load_meta(path)
    if (path / "config.json").exists():
        from .hf import load_hf
        return load_hf(path)
    raise CheckpointError(f"{path}: not a checkpoint folder (no config.json or params.json, no weights)")
