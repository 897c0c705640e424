"""Pick the loader from what PATH is: a .gguf file, a Meta folder (params.json) or a Hugging Face folder.

Image-token families: an Emu3 folder is recognised by its config.json; a LlamaGen `.pt` state dict
(or an Emu3.5-style folder) needs `--family` (see export/families).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import Checkpoint, CheckpointError

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def load_checkpoint(path: str | Path, family: str | None = None, **family_options) -> Checkpoint:
    """family: force a family whose checkpoints cannot be recognised from the files alone
    (e.g. "llamagen-c2i" for a bare .pt state dict); family_options go to that family's loader."""
    path = Path(path)
    family_options = {k: v for k, v in family_options.items() if v is not None}
    if family not in (None, "auto"):
        from ..families import load_family
        return load_family(path, family, **family_options)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".gguf":
            _no_options(path, family_options)
            from .gguf_file import load_gguf
            return load_gguf(path)
        if path.suffix in STATE_DICT_SUFFIXES:
            raise CheckpointError(f"{path}: a bare PyTorch state dict: name its family with --family "
                                  f"(llamagen-c2i or llamagen-t2i)")
        raise CheckpointError(f"{path}: expected a .gguf file or a checkpoint folder")
    if (path / "params.json").exists():
        _no_options(path, family_options)
        from .meta import load_meta
        return load_meta(path)
    if (path / "config.json").exists():
        from ..families import is_emu3_config
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            cfg = {}     # load_hf names the broken file
        if is_emu3_config(cfg):
            from ..families.emu3 import load_emu3
            return load_emu3(path, **family_options)
        _no_options(path, family_options)
        from .hf import load_hf
        return load_hf(path)
    raise CheckpointError(f"{path}: not a checkpoint folder (no config.json or params.json, no weights)")


def _no_options(path: Path, options: dict) -> None:
    if options:
        flags = ", ".join("--" + k.replace("_", "-") for k in options)
        raise CheckpointError(f"{path}: {flags} only apply to image-token families (--family llamagen-c2i, ...)")
