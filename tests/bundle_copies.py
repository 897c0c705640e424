"""A bundle's files shared into another folder, for tests that change one file of a bundle."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def shadow(src: Path, dst: Path) -> Path:
    """A bundle sharing src's files through hard links (no copies; symlinks would lead out of the bundle
    folder, which Bundle.load refuses). Tests replace a file by unlinking it first, never in place."""
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.is_file():
            try:
                os.link(f.resolve(), dst / f.name)
            except OSError:                      # another file system
                shutil.copy2(f, dst / f.name)
    return dst
