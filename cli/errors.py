"""Which exceptions the CLI reports as one line (exit status 2) rather than as a bug."""
from __future__ import annotations


class UserError(Exception):
    """Bad input found by the command line itself (options that do not go together)."""


def user_errors() -> tuple[type[Exception], ...]:
    """Exception types that describe bad input rather than a bug."""
    from ardeploy.export.errors import CheckpointError, ExportError
    from ardeploy.runtime.bundle import BundleError
    return (UserError, ValueError, IndexError, FileNotFoundError, PermissionError, BundleError, CheckpointError,
            ExportError)
