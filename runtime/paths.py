"""Paths a bundle (or an engines record, or a checkpoint index) names, kept inside its folder.

A manifest is data from wherever the bundle came from: a file entry such as `../notes.txt`,
`/etc/passwd` or a symlink pointing out of the folder would make ardeploy read, or copy over,
files that are not part of the bundle. Every such entry goes through `inside` before it is used.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from .errors import BundleError


def inside(folder: str | Path, name: str, what: str, error: type[Exception] = BundleError) -> Path:
    """folder / name, refused in one line (`error`) when `name` is not a plain
    relative path or resolves (through symlinks) outside `folder`. `what` names the entry, e.g.
    "B/manifest.json: graphs.decode.file"."""
    folder = Path(folder)
    problem = _name_problem(name)
    if problem is None and not _resolves_within(folder, folder / name):
        problem = "leads outside the folder (through a symlink)"
    if problem:
        raise error(f"{what} {name!r} {problem}: every file must lie inside {folder}")
    return folder / name


def _name_problem(name) -> str | None:
    if not isinstance(name, str) or not name.strip(" ./") or "\x00" in name:
        return "is not a file name"
    if PurePosixPath(name).is_absolute() or Path(name).is_absolute():
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "climbs out with '..'"
    return None


def _resolves_within(folder: Path, path: Path) -> bool:
    return folder.resolve() in path.resolve().parents

