"""Which exceptions the CLI reports as the user's to fix (one line, exit status 2) rather than as a bug."""
from __future__ import annotations

import errno

from ardeploy.runtime.errors import UserError as RuntimeUserError


class UserError(RuntimeUserError):
    """Bad input found by the command line itself (options that do not go together)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that describe input the user can fix: every stage's UserError (BundleError,
    CheckpointError, ExportError, EngineError are subclasses) and the OS errors that name a path."""
    return (RuntimeUserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


# OS errors of the machine's resources rather than of ardeploy: a full or read-only disk, a quota,
# memory the user asked for (a --max-seq too large for the machine).
RESOURCE_ERRNOS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS", "EFBIG", "ENOMEM")
                   if hasattr(errno, name)}


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, user_errors()) or isinstance(e, MemoryError) or \
        (isinstance(e, OSError) and e.errno in RESOURCE_ERRNOS)


def describe_user_error(e: BaseException) -> str:
    """One line: OS errors name the path (`PATH: No such file or directory`)."""
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
        text = ("not enough memory for what was asked: ask for less (a smaller --max-seq, --max-batch, --samples "
                "or --seq-len) or free memory")
    elif isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    elif isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror} (free space or choose another place to write)" if e.errno in RESOURCE_ERRNOS \
            else e.strerror
    else:
        text = str(e)
    return " ".join(text.split())


def describe_bug(e: BaseException) -> str:
    """One line for an error that is not the user's: what it was and how to see more."""
    message = " ".join(str(e).split())
    if len(message) > 300:
        message = message[:300] + " ..."
    return (f"ardeploy: internal error (a bug in ardeploy): {type(e).__name__}: {message} "
            f"(run again with --debug for the traceback)")
