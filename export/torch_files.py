"""Reading PyTorch `.pt`/`.pth` files safely: tensors only, and one clear error naming the file.

Meta shards and LlamaGen checkpoints both come through here, so a refused or unreadable file reads
the same whichever loader met it.
"""
from __future__ import annotations

import argparse
import pickle
import re
from pathlib import Path

import torch

from .errors import CheckpointError


def load_torch_file(path: Path, allowed_globals: tuple[type, ...] = (), legacy_format: bool = False):
    """torch.load with weights_only (never unpickle arbitrary objects) and mmap (tensors are read
    when touched). allowed_globals: classes the file may also hold (LlamaGen's training checkpoints
    pickle their argparse args); legacy_format: also read the pre-zip format, which cannot be mapped."""
    try:
        with torch.serialization.safe_globals(list(allowed_globals)):
            return _load(path, legacy_format)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused to load: it holds a Python object{what}, not only tensors") from None
    except Exception as e:   # truncated or not a torch file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(e).__name__}: {first})") from None


def load_tensor_dict(path: Path) -> dict[str, torch.Tensor]:
    """A file holding one flat dict of named tensors (a Meta shard), mapped: no tensor's bytes are
    read until it is used."""
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict (a {type(obj).__name__})")
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {name!r} is a {type(value).__name__}, not a tensor")
    return obj


def _load(path: Path, legacy_format: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if not legacy_format or "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def training_state_dict(path: Path, marker: str) -> dict[str, torch.Tensor]:
    """The tensors of a LlamaGen-style training checkpoint: its argparse args are allowed in the
    file and the pre-zip format is read too (see `state_dict_of` for `marker`)."""
    obj = load_torch_file(path, allowed_globals=(argparse.Namespace,), legacy_format=True)
    return state_dict_of(obj, path, marker)


def state_dict_of(obj, path: Path, marker: str) -> dict[str, torch.Tensor]:
    """The tensors inside a training checkpoint ({"model"|"module"|"state_dict": ...} or bare); the
    container whose keys include `marker` is the one taken."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a state dict (a {type(obj).__name__})")
    for key in ("model", "module", "state_dict"):
        if isinstance(obj.get(key), dict) and any(marker in k for k in obj[key]):
            obj = obj[key]
            break
    tensors = {}
    for name, value in obj.items():
        if isinstance(value, torch.Tensor):
            tensors[name.removeprefix("_orig_mod.").removeprefix("module.")] = value
    return tensors
