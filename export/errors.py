"""Errors that describe bad input (a checkpoint we cannot read, a target we cannot write).

Kept free of torch so the command line can catch them without importing the exporter.
"""


class CheckpointError(ValueError):
    """A checkpoint we cannot read: the message names the file or tensor at fault."""


class ExportError(RuntimeError):
    """An export that cannot proceed (bad option, unwritable output)."""
