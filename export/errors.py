"""Errors that describe bad input (a checkpoint we cannot read, a target we cannot write).

Kept free of torch so the command line can catch them without importing the exporter.
"""
from ..runtime.errors import UserError


class CheckpointError(UserError):
    """A checkpoint we cannot read: the message names the file or tensor at fault."""


class ExportError(UserError):
    """An export that cannot proceed (bad option, unwritable output)."""
