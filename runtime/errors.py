"""The errors that describe input the user can fix (one line, exit status 2 at the command line).

Every stage raises `UserError` (or its own subclass of it) for bad options, prompts, files, bundles
and sizes, with a message naming the file or value at fault. Anything else reaching the command
line is a bug in ardeploy: one line saying so (exit status 3), the traceback behind `--debug`.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input the user can fix: the message names the file, option or value at fault."""


class EngineError(UserError):
    """Something the user can fix: a missing TensorRT, a bundle of the wrong precision, a bad option."""


class BundleError(UserError):
    """A bundle we cannot use; the message names the file or field at fault."""
