"""The `ardeploy` command line: one subcommand per step of the pipeline.

    ardeploy export PATH --out BUNDLE        checkpoint (HF folder, Meta folder, .gguf, or "smollm2") -> bundle
    ardeploy verify BUNDLE                   ONNX Runtime vs PyTorch reference (and transformers)
    ardeploy generate BUNDLE --prompt TEXT   stream a completion
    ardeploy chat BUNDLE                     interactive chat that keeps its KV cache between turns
    ardeploy generate-image / calibrate / eval / build / inspect / compare / plan / bench

Each group of commands lives in its own module (text_commands, image_commands, calibration_commands,
engine_commands, bench) with a register(subparsers) function; options they share come from options.py.
Errors in what the user gave (paths, values, bundles) print one line and exit with status 2; anything
else is a bug in ardeploy: one line saying so and exit status 3 (`--debug` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import sys
import traceback

from . import bench, calibration_commands, engine_commands, image_commands, plan_commands, text_commands
from .errors import describe_bug, describe_user_error, user_errors

COMMAND_MODULES = [text_commands, engine_commands, plan_commands, calibration_commands, image_commands, bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ardeploy", description="Deploy LLaMA-family models via ONNX and TensorRT.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the Python traceback (for bug reports)")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    for command in sub.choices.values():         # --debug after the command name works too
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ardeploy.runtime.log import log, set_verbosity
    level = log.level
    set_verbosity(args.quiet, args.verbose)
    try:
        return args.func(args)
    except user_errors() as e:
        if args.debug:
            traceback.print_exc()
        print(f"ardeploy: error: {describe_user_error(e)}", file=sys.stderr)   # always one line
        return 2
    except KeyboardInterrupt:
        print("ardeploy: interrupted", file=sys.stderr)
        return 130
    except Exception as e:                           # noqa: BLE001 - anything else is ours to fix
        if args.debug:
            traceback.print_exc()
        else:
            print(describe_bug(e), file=sys.stderr)
        return 3
    finally:
        log.setLevel(level)          # main() may run many times in one process (tests): leave no trace
