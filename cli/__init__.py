"""The `ardeploy` command line: one subcommand per step of the pipeline.

    ardeploy export PATH --out BUNDLE        checkpoint (HF folder, Meta folder, .gguf, or "smollm2") -> bundle
    ardeploy verify BUNDLE                   ONNX Runtime vs PyTorch reference (and transformers)
    ardeploy generate BUNDLE --prompt TEXT   stream a completion
    ardeploy chat BUNDLE                     interactive chat that keeps its KV cache between turns
    ardeploy generate-image / calibrate / eval / build / inspect / compare / bench

Each group of commands lives in its own module (text_commands, image_commands, calibration_commands,
engine_commands, bench) with a register(subparsers) function; options they share come from options.py.
Errors in what the user gave (paths, values, bundles) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys

from . import bench, calibration_commands, engine_commands, image_commands, text_commands
from .errors import user_errors

COMMAND_MODULES = [text_commands, engine_commands, calibration_commands, image_commands, bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ardeploy", description="Deploy LLaMA-family models via ONNX and TensorRT.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ardeploy.runtime.log import log, set_verbosity
    level = log.level
    set_verbosity(args.quiet, args.verbose)
    try:
        return args.func(args)
    except user_errors() as e:
        print(f"ardeploy: error: {' '.join(str(e).split())}", file=sys.stderr)   # always one line
        return 2
    except KeyboardInterrupt:
        print("ardeploy: interrupted", file=sys.stderr)
        return 130
    finally:
        log.setLevel(level)          # main() may run many times in one process (tests): leave no trace
