"""Folders written whole or not at all: build in a hidden temporary folder beside the target, then
move it into place with a rename. Export, engine builds and calibration all write this way, so a
failure, a full disk, Ctrl-C or SIGTERM never leaves a half-written folder behind, and a partial
folder left by a killed run (SIGKILL, power loss) is removed by the next run into the same place.

    replace = check_out(out, force)       # before any work: refuse what must not be written
    with folder_written_whole(out, replace=replace) as tmp:
        ...write files into tmp...        # on success tmp becomes out; on any error tmp is removed
        record_files(tmp, manifest)       # the list of ardeploy's files that a later --force checks

Nothing ardeploy did not write is ever deleted: without `replace` the final rename refuses an `out`
that appeared meanwhile; with it (--force) `out` is replaced only while every file in it is one its
manifest.json / engines.json lists as ardeploy's own.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from .errors import UserError

# What marks a folder as ardeploy's own, and where its list of files is: manifest.json (a bundle,
# possibly with engines/ inside) or engines.json (an engines folder).
OWN_FOLDER_MARKS = {"manifest.json": "ardeploy-bundle", "engines.json": "ardeploy-engines"}
ENGINES = "engines"
FILES = "files"
# Errors of the file system under --out that the user can fix (free space, a writable place).
FULL_OR_READ_ONLY = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG") if hasattr(errno, name)}
HELD_SIGNALS = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}


# -- which files are ardeploy's ------------------------------------------------------------------
def files_written(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted relative POSIX paths (what a manifest's `files` lists)."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def record_files(folder: Path, record: dict, record_name: str = "manifest.json") -> dict:
    """`record` with `files`: everything now in `folder` plus the record itself (written next)."""
    record[FILES] = sorted(set(files_written(folder)) | {record_name})
    return record


def _read_record(path: Path, fmt: str) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == fmt else None


def _listed(record: dict, record_name: str) -> set[str]:
    """The files a record says ardeploy wrote: its `files`, or (records written before that list)
    the files it names."""
    files = record.get(FILES)
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return set(files) | {record_name}
    named = {record_name}
    with contextlib.suppress(KeyError, TypeError, AttributeError):
        from .manifest_checks import file_entries
        named |= set(file_entries(record).values()) if record_name == "manifest.json" else \
            {e["file"] for e in record["engines"]} | {record["layers"]["file"]}
    return {name for name in named if isinstance(name, str)}


def own_files(folder: Path) -> set[str] | None:
    """Relative paths of the files ardeploy's records in `folder` list (None: no ardeploy record)."""
    folder, owned, found = Path(folder), set(), False
    for prefix, name in (("", "manifest.json"), ("", "engines.json"), (f"{ENGINES}/", "engines.json")):
        record = _read_record(folder / prefix / name, OWN_FOLDER_MARKS[name])
        if record is not None:
            found = True
            owned |= {prefix + f for f in _listed(record, name)}
    return owned if found else None


def written_by_ardeploy(folder: Path) -> bool:
    """A bundle or an engines folder: its manifest.json / engines.json says it is ardeploy's."""
    return own_files(folder) is not None


def first_foreign(folder: Path) -> str | None:
    """The first entry of `folder` (sorted, level by level) that no ardeploy record lists, or None
    when all are its own. Partial folders an engine build leaves inside a bundle count as its own."""
    folder = Path(folder)
    owned = own_files(folder) or set()
    parents = {p.as_posix() for f in owned for p in Path(f).parents}
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        links = [d for d in dirs if (Path(root) / d).is_symlink()]
        dirs[:] = sorted(d for d in dirs if d not in links and not _is_partial(d, of=ENGINES))
        for name in sorted(files + links):
            if (rel / name).as_posix() not in owned:
                return (rel / name).as_posix()
        for name in dirs:
            if (rel / name).as_posix() not in parents:
                return (rel / name).as_posix() + "/"
    return None


# -- before any work -----------------------------------------------------------------------------
def check_out(out: Path, force: bool, error: type[Exception] = UserError) -> bool:
    """Refuse an output we cannot or must not write, before any work is done; True when `out` exists
    and will be replaced (--force on a folder holding only ardeploy's files)."""
    out = Path(out).resolve()
    replace = False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise error(f"{out}: already exists and is not empty (use --force to replace it)")
        _check_replaceable(out, error)
        replace = True
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise error(f"{out}: cannot write there ({parent} is not a folder)")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise error(f"{out}: cannot write there ({parent} is not writable)")
            break
    return replace


def _check_replaceable(out: Path, error: type[Exception]) -> None:
    if not out.is_dir() or not written_by_ardeploy(out):
        raise error(f"{out}: not a folder ardeploy wrote (no bundle manifest.json or engines.json): "
                    f"--force replaces only those, so it was left as it is")
    foreign = first_foreign(out)
    if foreign is not None:
        raise error(f"{out}: holds {foreign}, which ardeploy did not write: --force replaces only a folder of "
                    f"ardeploy's own files, so it was left as it is (move that file away, or choose another --out)")


# -- the temporary folder ------------------------------------------------------------------------
def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")


def _is_partial(name: str, of: str) -> bool:
    match = PARTIAL.match(name)
    return match is not None and match["name"] == of


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:              # another user's process: alive
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Partial (and swapped-out) folders beside `out` left by runs on this machine that no longer
    exist (killed with SIGKILL, or the machine went down); returns what was removed."""
    out, removed = Path(out), []
    with contextlib.suppress(OSError):
        for entry in out.parent.iterdir():
            match = PARTIAL.match(entry.name)
            if (match and match["name"] == out.name and match["host"] == _host_tag() and entry.is_dir()
                    and not entry.is_symlink() and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"]))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def temp_beside(out: Path, error: type[Exception] = UserError) -> Path:
    """A new hidden folder next to `out` (same file system, so the final rename is atomic), named
    after this process so that a later run can tell a killed run's leftover from a live one's."""
    out = Path(out).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{_host_tag()}-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise error(f"{out}: cannot write there ({e.strerror})") from None


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT/SIGTERM/SIGHUP for a few renames, so that they happen whole (the signal is
    delivered right after)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# -- the final move ------------------------------------------------------------------------------
def move_into_place(tmp: Path, out: Path, replace: bool = False, error: type[Exception] = UserError) -> None:
    """`tmp` becomes `out`. Without `replace`, an `out` that now exists (another process, a user) is
    refused and left as it is; with it, `out` is swapped out and removed only if it still holds
    nothing but ardeploy's own files."""
    out = Path(out).resolve()
    if replace and out.exists():
        _check_replaceable(out, error)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{_host_tag()}-{os.getpid()}-", dir=out.parent))
        os.replace(out, old / out.name)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old / out.name, out)       # put the old folder back before reporting
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)          # replaces at most an empty folder: never a file or a folder's contents
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise error(f"{out}: appeared while ardeploy was writing it (another process or user?): it was left "
                        f"as it is and this run's output discarded (choose another --out, or use --force if "
                        f"it is ardeploy's)") from None
        raise


def write_file_whole(path: str | Path, data: bytes) -> Path:
    """One file written whole or not at all: the bytes go to a hidden file beside `path`, renamed onto it at
    the end; a failure (a full disk, Ctrl-C, SIGTERM) removes that file and leaves `path` as it was. A file
    system error becomes a UserError naming `path`, not the temporary name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"{path}: cannot write there: {e.strerror or e}") from None
        raise
    return path


def describe_write_error(out: Path, e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    return f"{out}: cannot write there: {e.strerror or e}{where}"


@contextlib.contextmanager
def folder_written_whole(out: Path, error: type[Exception] = UserError, replace: bool = False):
    """Yield a temporary folder beside `out`; it becomes `out` when the block finishes, and is
    removed (leaving `out` as it was) when the block raises. A full or read-only file system becomes
    `error` naming `out`. `replace`: what check_out returned."""
    tmp = temp_beside(out, error)
    try:
        yield tmp
        with signals_held():
            move_into_place(tmp, out, replace, error)
    except BaseException as e:
        with signals_held():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in FULL_OR_READ_ONLY:
            raise error(describe_write_error(Path(out).resolve(), e)) from None
        raise
