"""Small file helpers every stage shares: content hashes and the download/build cache folder."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (weights files are large)."""
    return hash_file_into(hashlib.sha256(), path).hexdigest()


def hash_file_into(digest, path: str | Path, chunk: int = 1 << 22):
    """Feed a file's bytes into a hashlib object (for one hash over several files); returns it."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest


def cache_dir() -> Path:
    """Where downloads and TensorRT timing caches are kept: $ARDEPLOY_CACHE or ~/.cache/ardeploy."""
    return Path(os.environ.get("ARDEPLOY_CACHE") or Path.home() / ".cache" / "ardeploy")
