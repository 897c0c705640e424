"""Folders written whole or not at all: build in a hidden temporary folder beside the target, then
swap it in with a rename. Export, engine builds and calibration all write this way, so a failure
(or Ctrl-C) never leaves a half-written bundle behind.

    check_out(out, force)                 # before any work: refuse what must not be written
    with folder_written_whole(out) as tmp:
        ...write files into tmp...        # on success tmp replaces out; on any error tmp is removed
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


# What marks a folder as ardeploy's own: --force replaces only such a folder (or an empty one).
OWN_FOLDER_MARKS = {"manifest.json": "ardeploy-bundle", "engines.json": "ardeploy-engines"}


def written_by_ardeploy(folder: Path) -> bool:
    """A bundle or an engines folder: its manifest.json / engines.json says it is ardeploy's."""
    import json
    for name, fmt in OWN_FOLDER_MARKS.items():
        try:
            if json.loads((folder / name).read_text(encoding="utf-8")).get("format") == fmt:
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def check_out(out: Path, force: bool, error: type[Exception] = ValueError) -> None:
    """Refuse an output we cannot or must not write, before any work is done. --force replaces a
    folder ardeploy wrote (a bundle, an engines folder) or an empty one, nothing else."""
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise error(f"{out}: already exists and is not empty (use --force to replace it)")
        if not out.is_dir() or not written_by_ardeploy(out):
            raise error(f"{out}: not a folder ardeploy wrote (no bundle manifest.json or engines.json): "
                        f"--force replaces only those, so it was left as it is")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error(f"{out}: cannot write there ({parent} is not a folder)")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise error(f"{out}: cannot write there ({parent} is not writable)")
            break


def temp_beside(out: Path, error: type[Exception] = ValueError) -> Path:
    """A new hidden folder next to `out` (same file system, so the final rename is atomic)."""
    out = Path(out).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise error(f"{out}: cannot write there ({e.strerror})") from None


def move_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` (if any) by the finished folder `tmp`."""
    out = Path(out).resolve()
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def folder_written_whole(out: Path, error: type[Exception] = ValueError):
    """Yield a temporary folder beside `out`; it becomes `out` when the block finishes, and is
    removed (leaving `out` as it was) when the block raises."""
    tmp = temp_beside(out, error)
    try:
        yield tmp
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
