"""The `ardeploy` command line: one subcommand per step of the pipeline.

    ardeploy export PATH --out BUNDLE        checkpoint (HF folder, Meta folder, .gguf, or "smollm2") -> bundle
    ardeploy verify BUNDLE                   ONNX Runtime vs PyTorch reference (and transformers)
    ardeploy generate BUNDLE --prompt TEXT   stream a completion
    ardeploy chat BUNDLE                     interactive chat that keeps its KV cache between turns

Errors in what the user gave (paths, values, bundles) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


class UserError(Exception):
    pass


def _user_errors():
    """Exception types that describe bad input rather than a bug."""
    errors = [UserError, ValueError, IndexError, FileNotFoundError, PermissionError]
    from ardeploy.runtime.bundle import BundleError
    errors.append(BundleError)
    return tuple(errors)


# -- export / verify ------------------------------------------------------------------------------
def cmd_export(a) -> int:
    from ardeploy.export.bundle import export_path

    from .models import resolve
    t = time.perf_counter()
    family_options = {k: v for k, v in (("image_size", a.image_size), ("vq", a.vq)) if v is not None}
    manifest = export_path(resolve(a.path), a.out, family=a.family, family_options=family_options,
                           dtype=a.dtype, max_seq=a.max_seq, max_batch=a.max_batch,
                           opset=a.opset, force=a.force, quiet=a.quiet, score_graph=not a.no_score)
    size = manifest["weights"]["bytes"] / 2**20
    print(f"exported {manifest['spec']['architecture']} ({manifest['spec']['n_layers']} layers, {manifest['dtype']}) "
          f"to {a.out}: graphs {', '.join(manifest['graphs'])}; weights {size:.1f} MiB held once; "
          f"{time.perf_counter() - t:.1f} s")
    return 0


def cmd_verify(a) -> int:
    from ardeploy.export.verify import verify_bundle
    ids = [int(x) for x in a.prompt_ids.split(",")] if a.prompt_ids else None
    rep = verify_bundle(a.bundle, source=a.source, steps=a.steps, prompt_ids=ids,
                        with_transformers=a.transformers, threads=a.threads)
    if a.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"bundle {rep['bundle']} ({rep['dtype']}), prompt {rep['prompt_tokens']} tokens, {rep['steps']} greedy steps")
        for c in rep["comparisons"]:
            agree = "identical" if c["greedy_agree"] else f"diverge at step {c['first_disagreement_step']}"
            print(f"  vs {c['reference']:<24} max |dlogits| {c['max_abs_dlogits']:.3g}   greedy tokens {agree}")
    ok = all(c["greedy_agree"] for c in rep["comparisons"])
    if a.atol is not None:
        ok = ok and all(c["max_abs_dlogits"] <= a.atol for c in rep["comparisons"])
    return 0 if ok else 1


# -- generate / chat ------------------------------------------------------------------------------
def sampling_from_args(a):
    from ardeploy.runtime import SamplingConfig
    return SamplingConfig(max_new_tokens=a.max_new_tokens, greedy=a.greedy, temperature=a.temperature,
                          top_k=a.top_k, top_p=a.top_p, min_p=a.min_p, repetition_penalty=a.repetition_penalty,
                          seed=a.seed, stop=[s.encode().decode("unicode_escape") for s in a.stop],
                          ignore_eos=a.ignore_eos)


def load_generator(a):
    from ardeploy.runtime import Generator
    kw = {"threads": a.threads} if a.backend == "ort" else {}
    return Generator.load(a.bundle, backend=a.backend, **kw)


def cmd_generate(a) -> int:
    cfg = sampling_from_args(a)
    if (a.prompt is None) == (a.prompt_ids is None):
        raise UserError("give exactly one of --prompt or --prompt-ids")
    gen = load_generator(a)
    prompt = a.prompt if a.prompt is not None else [int(x) for x in a.prompt_ids.split(",")]
    from ardeploy.runtime.generator import Run
    run = Run(gen.events([gen.to_ids(prompt, a.chat)], cfg))
    for ev in run:
        if not a.json and ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    result = run.results[0]
    if a.json:
        print(json.dumps(result.to_json(), ensure_ascii=False))
    else:
        print()
        print(f"[{len(result.token_ids)} tokens, stop: {result.stop_reason}, first token {result.ttft_s * 1000:.0f} ms, "
              f"{result.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_chat(a) -> int:
    from ardeploy.runtime import ChatSession
    cfg = sampling_from_args(a)
    gen = load_generator(a)
    session = ChatSession(gen, system=a.system)
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        for piece in session.turn(user, cfg):
            sys.stdout.write(piece)
            sys.stdout.flush()
        r = session.last
        print()
        print(f"[{len(r.token_ids)} tokens, {r.decode_tokens_per_s:.1f} tok/s, stop: {r.stop_reason}]", file=sys.stderr)
    return 0


# -- parser ---------------------------------------------------------------------------------------
def add_sampling_args(p):
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--min-p", type=float, default=0.0, help="0.0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable; \\n escapes allowed)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")


def add_backend_args(p):
    p.add_argument("--backend", default="ort", choices=["ort", "trt"], help="ONNX Runtime or TensorRT engines")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime (default: all)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ardeploy", description="Deploy LLaMA-family models via ONNX and TensorRT.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("export", help="checkpoint -> bundle (prefill/decode/score ONNX graphs, shared weights)",
                       description="Export a Hugging Face folder (Llama/Qwen3), a Meta folder (params.json + "
                                   "consolidated.*.pth), a llama-architecture .gguf file, or the name 'smollm2' "
                                   "(downloaded once) into a bundle folder.")
    p.add_argument("path", help="checkpoint folder, .gguf file, or 'smollm2'")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights, activations and KV cache type (norms and softmax stay fp32)")
    p.add_argument("--max-seq", type=int, default=2048, help="KV cache length the runtime allocates")
    p.add_argument("--max-batch", type=int, default=1, help="largest batch the runtime allocates for")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset (21: newest that TensorRT 10.x parsers know)")
    p.add_argument("--no-score", action="store_true", help="skip the all-positions graph used by eval/calibrate")
    p.add_argument("--family", default=None,
                   help="model family when the files cannot tell (e.g. llamagen-c2i for a bare .pt state dict)")
    p.add_argument("--image-size", type=int, default=None, help="image-token models: image size in pixels")
    p.add_argument("--vq", default=None, help="image-token models: VQ tokenizer checkpoint whose decoder is exported")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_export)

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
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="generate text (streams to the terminal)")
    p.add_argument("bundle")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-ids", help="comma-separated token ids instead of text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    add_sampling_args(p)
    add_backend_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat; the KV cache is kept between turns")
    p.add_argument("bundle")
    p.add_argument("--system", help="system prompt")
    add_sampling_args(p)
    add_backend_args(p)
    p.set_defaults(func=cmd_chat)

    # Commands owned by the other packages: each module defines register(subparsers).
    import importlib
    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module).register(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return ap


COMMAND_MODULES = ["ardeploy.engines.commands", "ardeploy.calibration.commands", "ardeploy.image_commands",
                   "ardeploy.bench"]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ardeploy.export.errors import CheckpointError, ExportError
    try:
        return args.func(args)
    except (*_user_errors(), CheckpointError, ExportError) as e:
        print(f"ardeploy: error: {' '.join(str(e).split())}", file=sys.stderr)   # always one line
        return 2
    except KeyboardInterrupt:
        print("ardeploy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
