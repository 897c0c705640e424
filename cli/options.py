"""The options several commands share, declared once so that they read and behave the same everywhere."""
from __future__ import annotations

import argparse
import re

from ardeploy.runtime.sampling import MIN_TEMPERATURE

from .errors import UserError

BACKENDS = ["ort", "trt"]


def add_verbosity(p, verbose_help: str = "more detail (debug messages)") -> None:
    """--quiet / -v on every command; the CLI hands them to runtime.log.set_verbosity once."""
    p.add_argument("--quiet", action="store_true", help="no progress display; warnings and errors only")
    p.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)


def add_json(p, what: str = "the results") -> None:
    """--json: one JSON document on stdout in place of the human-readable output."""
    p.add_argument("--json", action="store_true", help=f"print {what} as one JSON document instead of the usual output")


def add_out_force(p, out_help: str, force_help: str = "replace an existing output folder") -> None:
    """--out FOLDER (required) and --force, for commands that write a new folder."""
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--force", action="store_true", help=force_help)


def add_backend(p) -> None:
    p.add_argument("--backend", default="ort", choices=BACKENDS, help="ONNX Runtime or TensorRT engines")


def add_threads(p) -> None:
    p.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime, at least 1 (default: all)")


def add_backend_threads(p) -> None:
    add_backend(p)
    add_threads(p)


def add_device(p, cuda_graph: bool = True) -> None:
    """--device cpu|cuda: where ONNX Runtime runs the graphs (cuda needs onnxruntime-gpu: pip install
    'ardeploy[gpu]'); --no-cuda-graph where the decode step can be replayed as a CUDA graph."""
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="ONNX Runtime on the CPU (default) or an NVIDIA GPU (cuda: needs onnxruntime-gpu, "
                        "pip install 'ardeploy[gpu]'; the cache, inputs and logits then stay on the GPU)")
    if cuda_graph:
        p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                       help="on the GPU, run every decode step plainly instead of replaying it as a captured "
                            "CUDA graph (slower; for comparisons and diagnosis)")


def add_kv_budget(p) -> None:
    p.add_argument("--kv-budget", metavar="SIZE", default=None,
                   help="memory for the KV cache (e.g. 512MiB, 2GiB): the cache gets the longest max_seq that fits "
                        "at the batch size, at most the bundle's; too small for 16 positions is refused (see "
                        "`ardeploy plan BUNDLE --kv-budget SIZE`)")


def run_options(args, **fields):
    """The RunOptions (runtime/run_options.py) a command's flags describe, resolved once; an option the
    chosen backend cannot honour is refused there in one line. `fields` set what a command fixes itself."""
    from ardeploy.runtime.run_options import RunOptions
    given = {name: getattr(args, name) for name in ("backend", "device", "flavor", "threads", "cuda_graph")
             if name in vars(args)}
    if getattr(args, "draft", None):
        given["shared_threads"] = True  # the model and its draft take turns on the same cores (RunOptions)
    return RunOptions(**{**given, **fields})


def add_speculation(p) -> None:
    """--speculate ngram / --draft BUNDLE, --draft-tokens, --ngram (runtime/speculative.py)."""
    group = p.add_argument_group("speculative decoding (one prompt at a time; the same tokens as without, "
                                 "or for sampling the same distribution)")
    group.add_argument("--speculate", choices=["off", "ngram"], default="off",
                       help="ngram: draft from the prompt and output so far (prompt lookup; no memory); fast "
                            "where the answer repeats the prompt (editing code, filling tables)")
    group.add_argument("--draft", metavar="BUNDLE", help="draft with a smaller or quantized bundle of the same "
                                                         "tokenizer (e.g. the same model exported w4a16)")
    group.add_argument("--draft-tokens", type=int, default=8, metavar="K",
                       help="the most tokens drafted per step (1-31; adapted to how many are accepted)")
    group.add_argument("--ngram", type=int, default=3, metavar="N",
                       help="--speculate ngram: the longest run of last tokens matched (down to 1)")


def speculation(args, options):
    """The Speculation the flags describe (None: off); a --draft bundle is loaded with the same run options."""
    from ardeploy.runtime.speculative import Speculation
    if args.draft and args.speculate == "ngram":
        raise UserError("give either --speculate ngram or --draft BUNDLE, not both")
    if args.draft:
        from ardeploy.runtime import Generator
        draft = Generator.load(args.draft, options, max_batch=1)
        draft.warmup(verify_widths=range(2, args.draft_tokens + 2))     # the lengths its catch-up steps take
        return Speculation("draft", draft_tokens=args.draft_tokens, draft=draft)
    if args.speculate == "ngram":
        return Speculation("ngram", draft_tokens=args.draft_tokens, ngram=args.ngram)
    Speculation(draft_tokens=args.draft_tokens, ngram=args.ngram)          # the values are checked anyway
    return None


def add_flavor(p) -> None:
    p.add_argument("--flavor", default="auto", choices=["auto", "ort", "portable"],
                   help="ONNX Runtime: which graph runs (auto: the bundle's ONNX Runtime graph when it has one, "
                        "else the portable one)")


def add_token_filters(group, prefix: str = "--", family_defaults: bool = False) -> None:
    """--temperature / --top-k / --top-p; family_defaults: unset means the bundle family's published value."""
    unset = (lambda value: None) if family_defaults else (lambda value: value)
    tail = " (default: the family's)" if family_defaults else ""
    group.add_argument(f"{prefix}temperature", type=float, default=unset(1.0),
                       help=f"1.0 = as the model gives; 0, or below {MIN_TEMPERATURE:g} (which would overflow), "
                            f"= greedy{tail}")
    group.add_argument(f"{prefix}top-k", type=int, default=unset(0), help=f"0 = off{tail}")
    group.add_argument(f"{prefix}top-p", type=float, default=unset(1.0), help=f"1.0 = off{tail}")


def add_sampling(p) -> None:
    """The text sampling options of generate and chat (read back by sampling_config)."""
    group = p.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=256)
    group.add_argument("--greedy", action="store_true", help="always take the most likely token")
    add_token_filters(group)
    group.add_argument("--min-p", type=float, default=0.0, help="0.0 = off")
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    group.add_argument("--stop", action="append", default=[],
                       help="stop string, taken literally (repeatable; for a newline use $'\\n' in bash, or "
                            "--stop-escaped)")
    group.add_argument("--stop-escaped", action="append", default=[], metavar="STOP",
                       help="stop string with backslash escapes: \\n \\t \\r \\\\ \\xHH \\uXXXX (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")


def sampling_config(args: argparse.Namespace):
    """The SamplingConfig that add_sampling's options describe."""
    from ardeploy.runtime import SamplingConfig
    return SamplingConfig(max_new_tokens=args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=stop_strings(args), ignore_eos=args.ignore_eos)


def stop_strings(args: argparse.Namespace) -> list[str]:
    """--stop as given, --stop-escaped with its escapes read; text that is not UTF-8 is refused."""
    from ardeploy.runtime.text import check_text
    literal = [check_text(stop, f"--stop {stop!r}") for stop in args.stop]
    return literal + [unescape(check_text(stop, f"--stop-escaped {stop!r}"), "--stop-escaped")
                      for stop in args.stop_escaped]


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0", "'": "'", '"': '"'}
ESCAPE = re.compile(r"\\(?:x([0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.)|$)", re.DOTALL)


def unescape(text: str, option: str) -> str:
    r"""Backslash escapes read (ESCAPES, \xHH, \uXXXX, \UXXXXXXXX); any other backslash is refused."""
    def one(match) -> str:
        digits = match[1] or match[2] or match[3]
        if digits and int(digits, 16) <= 0x10FFFF:
            return chr(int(digits, 16))
        if match[4] in ESCAPES:
            return ESCAPES[match[4]]
        raise UserError(f"{option} {text!r}: bad escape {match[0]!r} at character {match.start()} (known: \\n \\t "
                        f"\\r \\\\ \\0 \\' \\\" \\xHH \\uXXXX \\UXXXXXXXX; --stop takes text literally)")
    return ESCAPE.sub(one, text)


def comma_ints(text: str, skip_empty: bool = False, option: str = "") -> list[int]:
    """'1,2,3' -> [1, 2, 3]; a bad number (or an empty part, unless skipped) is a UserError naming `option`."""
    try:
        return [int(x) for x in text.split(",") if x or not skip_empty]
    except ValueError:
        raise UserError(f"{option + ' ' if option else ''}{text!r}: expected comma-separated integers") from None
