"""`ardeploy export`, `verify`, `generate` and `chat`: checkpoint -> bundle -> text."""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

from ardeploy.runtime.text import check_text

from .errors import UserError
from .options import (add_backend_threads, add_device, add_flavor, add_json, add_out_force, add_sampling,
                      add_kv_budget, add_speculation, add_threads, add_verbosity, comma_ints, run_options,
                      sampling_config, speculation)


# -- export / verify ------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from ardeploy.export.bundle import export_path
    from ardeploy.export.named_models import resolve
    started = time.perf_counter()
    family_options = {k: v for k, v in (("image_size", args.image_size), ("vq", args.vq)) if v is not None}
    manifest = export_path(resolve(args.path), args.out, family=args.family, family_options=family_options,
                           dtype=args.dtype, max_seq=args.max_seq, max_batch=args.max_batch,
                           opset=args.opset, force=args.force, quiet=args.quiet, score_graph=not args.no_score,
                           target=args.target)
    size = manifest["weights"]["bytes"] / 2**20
    print(f"exported {manifest['spec']['architecture']} ({manifest['spec']['n_layers']} layers, {manifest['dtype']}) "
          f"to {args.out}: graphs {', '.join(manifest['graphs'])}; weights {size:.1f} MiB held once; "
          f"{time.perf_counter() - started:.1f} s")
    return 0


def cmd_verify(args) -> int:
    from ardeploy.export.verify import verify_bundle
    ids = comma_ints(args.prompt_ids, option="--prompt-ids") if args.prompt_ids else None
    report = verify_bundle(args.bundle, source=args.source, steps=args.steps, prompt_ids=ids,
                           with_transformers=args.transformers, options=run_options(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"bundle {report['bundle']} ({report['dtype']}, graph {report['graph']}), prompt {report['prompt_tokens']} tokens, "
              f"{report['steps']} greedy steps")
        for c in report["comparisons"]:
            agree = "identical" if c["greedy_agree"] else f"diverge at step {c['first_disagreement_step']}"
            print(f"  vs {c['reference']:<24} max |dlogits| {c['max_abs_dlogits']:.3g}   greedy tokens {agree}")
    ok = all(c["greedy_agree"] for c in report["comparisons"])
    if args.atol is not None:
        ok = ok and all(c["max_abs_dlogits"] <= args.atol for c in report["comparisons"])
    return 0 if ok else 1


# -- generate / chat ------------------------------------------------------------------------------
def load_generator(args, warmup: bool = True):
    """The generator, warmed up unless told not to (load and warm-up are reported apart from the first
    token), and the speculation its flags ask for (None: off)."""
    from ardeploy.runtime import Generator
    options = run_options(args)
    gen = Generator.load(args.bundle, options, warmup=warmup, kv_budget=args.kv_budget)   # refused there if too big
    return gen, speculation(args, options)


def verify_widths(spec) -> range:
    """The speculative verify steps to warm up: the last token and 1..K drafted ones."""
    return range(2, spec.draft_tokens + 2) if spec is not None else range(0)


def read_prompt_file(path: str) -> str:
    """--prompt-file PATH (- for standard input), as UTF-8 text."""
    if path == "-" and (sys.stdin is None or sys.stdin.closed):
        raise UserError("--prompt-file -: standard input is closed (pipe the prompt in, or give a file's path)")
    try:
        raw = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
    except OSError as e:
        raise UserError(f"--prompt-file {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--prompt-file {path}: not UTF-8 text (byte {e.start})") from None


def cmd_generate(args) -> int:
    cfg = sampling_config(args)
    given = [name for name in ("prompt", "prompt_ids", "prompt_file") if getattr(args, name) is not None]
    if len(given) != 1:
        raise UserError("give exactly one of --prompt, --prompt-file or --prompt-ids")
    if args.prompt is not None:
        check_text(args.prompt, "--prompt")
    gen, spec = load_generator(args, warmup=False)
    if args.prompt_ids is not None:
        prompt = comma_ints(args.prompt_ids, option="--prompt-ids")
    else:
        prompt = args.prompt if args.prompt is not None else read_prompt_file(args.prompt_file)
    ids = gen.to_ids(prompt, args.chat)
    gen.warmup(prompt_lengths=(len(ids),), verify_widths=verify_widths(spec))   # the first token: the prompt's cost
    from ardeploy.runtime.generator import Run
    run = Run(gen.events([ids], cfg, speculation=spec))
    for event in run:
        if not args.json and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    result = run.results[0]
    if args.json:
        print(json.dumps({**result.to_json(), "load_s": round(gen.load_s, 4), "warmup_s": round(gen.warmup_s, 4)},
                         ensure_ascii=False))
    else:
        print()
        spec = result.timings.get("speculation")
        drafted = (f", {spec['tokens_per_model_step']:.2f} tokens per model step (drafts accepted "
                   f"{100 * spec['acceptance_rate']:.0f} %)") if spec else ""
        print(f"[{len(result.token_ids)} tokens, stop: {result.stop_reason}, load {gen.load_s:.2f} s + warm-up "
              f"{gen.warmup_s * 1000:.0f} ms, first token {result.ttft_s * 1000:.1f} ms, "
              f"{result.decode_tokens_per_s:.1f} tok/s{drafted}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from ardeploy.runtime import ChatSession
    cfg = sampling_config(args)
    if args.system is not None:
        check_text(args.system, "--system")
    if sys.stdin is None or sys.stdin.closed:
        raise UserError("chat reads your messages from standard input, which is closed (run it in a terminal, "
                        "or pipe the messages in)")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")     # a line not in UTF-8 is then refused by its number
    gen, spec = load_generator(args)
    if spec is not None:
        gen.warmup(verify_widths=verify_widths(spec))
    session = ChatSession(gen, system=args.system)
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    for number in itertools.count(1):
        user = read_message(number)
        if user is None or not user.strip():
            break
        for piece in session.turn(user, cfg, speculation=spec):
            sys.stdout.write(piece)
            sys.stdout.flush()
        last = session.last
        print()
        print(f"[{len(last.token_ids)} tokens, {last.decode_tokens_per_s:.1f} tok/s, stop: {last.stop_reason}]",
              file=sys.stderr)
    return 0


def read_message(number: int) -> str | None:
    """The next line of standard input (None at its end); a line that is not UTF-8 is refused, naming it."""
    try:
        return check_text(input("> "), f"standard input, line {number}")
    except EOFError:
        return None
    except UnicodeDecodeError as e:
        raise UserError(f"standard input, line {number}: not valid UTF-8 (byte 0x{e.object[e.start:e.start + 1].hex()}); "
                        f"type or pipe the messages in UTF-8") from None


# -- parsers --------------------------------------------------------------------------------------
def register(sub) -> None:
    _register_export(sub)
    _register_verify(sub)
    _register_generate(sub)
    _register_chat(sub)


def _register_export(sub) -> None:
    p = sub.add_parser("export", help="checkpoint -> bundle (prefill/decode/score ONNX graphs, shared weights)",
                       description="Export a Hugging Face folder (Llama/Qwen3), a Meta folder (params.json + "
                                   "consolidated.*.pth), a llama-architecture .gguf file, or the name 'smollm2' "
                                   "(downloaded once) into a bundle folder.")
    p.add_argument("path", help="checkpoint folder, .gguf file, or 'smollm2'")
    add_out_force(p, "bundle folder to create", "replace an existing bundle")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights, activations and KV cache type (norms and softmax stay fp32)")
    p.add_argument("--max-seq", type=int, default=2048, help="KV cache length the runtime allocates")
    p.add_argument("--max-batch", type=int, default=1, help="largest batch the runtime allocates for")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (21: newest that TensorRT 10.x parsers know)")
    p.add_argument("--no-score", action="store_true", help="skip the all-positions graph used by eval/calibrate")
    p.add_argument("--target", default="ort", choices=["ort", "portable"],
                   help="ort (default): also write the ONNX Runtime graph the runtime runs (fused attention, the "
                        "KV cache updated in place); portable: plain ONNX only (what TensorRT builds from)")
    p.add_argument("--family", default=None,
                   help="model family when the files cannot tell (e.g. llamagen-c2i for a bare .pt state dict)")
    p.add_argument("--image-size", type=int, default=None, help="image-token models: image size in pixels")
    p.add_argument("--vq", default=None, help="image-token models: VQ tokenizer checkpoint whose decoder is exported")
    add_verbosity(p)
    p.set_defaults(func=cmd_export)


def _register_verify(sub) -> None:
    p = sub.add_parser("verify", help="compare a bundle in ONNX Runtime with the PyTorch reference",
                       description="Runs prefill + greedy decode steps in ONNX Runtime (KV in the runtime's arena) and "
                                   "compares every step's logits with our PyTorch modules and, for Hugging Face "
                                   "sources, transformers. Exit status 1 when greedy tokens disagree.")
    p.add_argument("bundle")
    p.add_argument("--source", help="checkpoint to compare with (default: the one recorded in manifest.json)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompt-ids", help="comma-separated token ids (default: a fixed English sentence)")
    p.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=None,
                   help="also compare with transformers (default: on for Hugging Face folders)")
    p.add_argument("--atol", type=float, default=None, help="also fail when max |dlogits| exceeds this")
    add_threads(p)
    add_flavor(p)
    add_device(p)
    add_json(p, "the comparison report")
    add_verbosity(p)
    p.set_defaults(func=cmd_verify)


def _register_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text (streams to the terminal)")
    p.add_argument("bundle")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a UTF-8 file (- : standard input)")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_json(p, "the result (text, token ids, timings, speculation statistics; nothing streamed)")
    add_sampling(p)
    add_speculation(p)
    add_kv_budget(p)
    add_backend_threads(p)
    add_flavor(p)
    add_device(p)
    add_verbosity(p)
    p.set_defaults(func=cmd_generate)


def _register_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat; the KV cache is kept between turns")
    p.add_argument("bundle")
    p.add_argument("--system", help="system prompt")
    add_sampling(p)
    add_speculation(p)
    add_kv_budget(p)
    add_backend_threads(p)
    add_flavor(p)
    add_device(p)
    add_verbosity(p)
    p.set_defaults(func=cmd_chat)
