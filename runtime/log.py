"""One logger for the whole toolkit: progress lines go to stderr through it.

The CLI sets the level once (`--quiet` hides progress, `-v` adds details); library code only calls
`log.info(...)` / `log.debug(...)` and `progress_enabled()` for its progress bars.
"""
from __future__ import annotations

import logging
import sys



class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (so redirections and pytest's capture see it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


log = logging.getLogger("ardeploy")
if not log.handlers:                       # progress messages print as they are, one per line
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def set_verbosity(quiet: bool = False, verbose: int = 0) -> None:
    """quiet: warnings and errors only; verbose >= 1: debug details too."""
    log.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


def progress_enabled() -> bool:
    """Whether progress bars should be drawn (not when the user asked for quiet)."""
    return log.isEnabledFor(logging.INFO)
