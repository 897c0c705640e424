"""The `ardeploy` command line: one subcommand per step of the pipeline.

    ardeploy export PATH --out BUNDLE        checkpoint (HF folder, Meta folder, .gguf, or "smollm2") -> bundle
    ardeploy verify BUNDLE                   ONNX Runtime vs PyTorch reference (and transformers)
    ardeploy generate BUNDLE --prompt TEXT   stream a completion
    ardeploy chat BUNDLE                     interactive chat that keeps its KV cache between turns
    ardeploy generate-image / calibrate / eval / build / inspect / compare / plan / bench
    ardeploy serve BUNDLE                    OpenAI-compatible HTTP server; ardeploy triton: a Triton model repository

Each group of commands lives in its own module (text_commands, image_commands, calibration_commands,
engine_commands, bench, serve_commands) with a register(subparsers) function; options they share come from options.py.
Errors in what the user gave (paths, values, bundles; a full or read-only disk, too little memory;
argparse's own complaints) print one line and exit with status 2; anything else is a bug in ardeploy:
one line saying so and exit status 3 (`--debug` shows the traceback instead). SIGTERM and SIGHUP end a
command as Ctrl-C does (128 + the signal; what it was writing is removed), and a reader of stdout that
went away (`| head`) ends it quietly with 141.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback

from . import bench, calibration_commands, engine_commands, image_commands, plan_commands, serve_commands, text_commands
from .errors import describe_bug, describe_user_error, is_user_error

COMMAND_MODULES = [text_commands, engine_commands, plan_commands, calibration_commands, image_commands, bench,
                   serve_commands]
# SIGINT already raises KeyboardInterrupt; SIGHUP exists on POSIX only
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
SIGPIPE_STATUS = 128 + 13


class Parser(argparse.ArgumentParser):
    """argparse with its complaints in one line and a pointer to --help, not a usage block first."""

    def error(self, message: str):
        self.exit(2, f"ardeploy: error: {' '.join(message.split())} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ardeploy", description="Deploy LLaMA-family models via ONNX and TensorRT.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback (for bug reports)")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    for command in sub.choices.values():         # --debug after the command name works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so that a folder being written is removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt():
    """While a command runs, SIGTERM and SIGHUP end it the way Ctrl-C does (unless they are ignored,
    as under nohup); the previous handlers come back afterwards (main may run many times in a process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in STOP_SIGNALS
                if signal.getsignal(sig) not in (signal.SIG_IGN, None)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stdout_gone() -> int:
    """The reader of stdout went away (`| head`): stop quietly, as `yes | head` does (128 + SIGPIPE)."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)       # the interpreter's final flush must not fail again
        os.dup2(devnull, sys.stdout.fileno())
    return SIGPIPE_STATUS


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ardeploy.runtime.log import log, set_verbosity
    level = log.level
    set_verbosity(args.quiet, args.verbose)
    try:
        with signals_interrupt():
            return args.func(args)
    except BrokenPipeError:
        return _stdout_gone()
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"ardeploy: interrupted{' by ' + signal.Signals(signum).name if signum != signal.SIGINT else ''}",
              file=sys.stderr)
        return 128 + signum
    except Exception as e:                           # noqa: BLE001 - sorted into the user's and ours
        return _report(e, args.debug)
    finally:
        log.setLevel(level)          # main() may run many times in one process (tests): leave no trace


def _report(e: Exception, debug: bool) -> int:
    """Bad input: one line, exit status 2. Anything else is ours to fix: one line saying so, exit status 3."""
    if debug:
        traceback.print_exc()
    if is_user_error(e):
        print(f"ardeploy: error: {describe_user_error(e)}", file=sys.stderr)   # always one line
        return 2
    if not debug:
        print(describe_bug(e), file=sys.stderr)
    return 3
