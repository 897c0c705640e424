"""Speculative decoding against plain decoding, and transformers' prompt lookup, in the same run.

    python scripts/bench_speculative.py --bundle bundles/smollm2 --draft bundles/smollm2-w4a16 --threads 2 \
        --gguf ~/.cache/ardeploy/SmolLM2-135M-Instruct.Q4_1.gguf \
        --llamacpp-gguf ~/.cache/ardeploy/SmolLM2-135M-Instruct.F32.gguf --json spec.json
    python scripts/bench_speculative.py --bundle bundles/smollm2-fp16 --device cuda --modes plain,ngram

Prompts: scripts/prompts/speculation.json ("copy": answers that repeat the prompt with changes; "open":
open-ended chat), chat template applied, greedy, up to --new-tokens tokens or end of sequence. For each
set and mode: decode tokens per second over all its prompts (tokens after the first / time after the
first), the ratio to plain decoding of the same run, and whether every token equals plain decoding's.
transformers runs the same prompts from the same GGUF with and without `prompt_lookup_num_tokens`; llama.cpp
(llama-cpp-python, if installed; not a dependency) our prompt ids on an F32 GGUF of the same weights (written by
scripts/bench_peers.py) with and without its prompt-lookup decoding.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPTS = Path(__file__).with_name("prompts") / "speculation.json"


def ours(args, prompts: dict) -> tuple[dict, dict]:
    """Our modes on each prompt set; returns (results, the prompt ids of each set, chat template applied)."""
    from ardeploy.runtime import Generator, SamplingConfig
    from ardeploy.runtime.run_options import RunOptions
    from ardeploy.runtime.speculative import Speculation
    options = RunOptions(device=args.device, threads=args.threads if args.device == "cpu" else None)
    gen = Generator.load(args.bundle, options, max_batch=1, warmup=True)
    modes = {"plain": None, "ngram": Speculation("ngram", draft_tokens=args.draft_tokens)}
    gens = {"plain": gen, "ngram": gen}
    if args.draft and "draft" in args.modes:
        # the model and its draft take turns on the same cores: both on one shared thread pool
        # (RunOptions.shared_threads); plain decoding keeps a pool of its own
        turns = options.replace(shared_threads=True)
        draft = Generator.load(args.draft, turns, max_batch=1, warmup=True)
        draft.warmup(verify_widths=range(2, args.draft_tokens + 2))
        modes["draft"] = Speculation("draft", draft_tokens=min(args.draft_tokens, 6), draft=draft)
        gens["draft"] = Generator.load(args.bundle, turns, max_batch=1, warmup=True)
    modes = {name: spec for name, spec in modes.items() if name in args.modes}
    cfg = SamplingConfig(greedy=True, max_new_tokens=args.new_tokens)
    out, encoded = {}, {}
    for kind, texts in prompts.items():
        ids = encoded[kind] = [gen.encode(text, chat=True) for text in texts]
        # each prompt length's and verify width's first-run cost (GPU: ~40 ms each) kept out of the timing
        for g in {id(g): g for g in gens.values()}.values():
            g.warmup(prompt_lengths=[len(x) for x in ids], verify_widths=range(2, args.draft_tokens + 2))
        rows, tokens = {}, {}
        for name, spec in modes.items():
            runs = [gens[name].generate(x, cfg, speculation=spec) for x in ids]
            rows[name], tokens[name] = summarize(runs), [r.token_ids for r in runs]
            print(f"  ours {kind:5} {name:6} {rows[name]['decode_tokens_per_s']:8.1f} tok/s "
                  f"{json.dumps(rows[name].get('speculation', {}))}", file=sys.stderr, flush=True)
        for name, row in rows.items():
            row["vs_plain"] = round(row["decode_tokens_per_s"] / rows["plain"]["decode_tokens_per_s"], 3)
            row["same_tokens_as_plain"] = tokens[name] == tokens["plain"]
            row["prompts_identical_to_plain"] = f"{sum(a == b for a, b in zip(tokens[name], tokens['plain']))}/{len(texts)}"
        out[kind] = rows
    return out, encoded


def summarize(runs) -> dict:
    """Decode rate over several runs: all their tokens after the first over all their time after it."""
    tokens = sum(len(r.token_ids) - 1 for r in runs)
    seconds = sum((len(r.token_ids) - 1) / r.decode_tokens_per_s for r in runs if r.decode_tokens_per_s > 0)
    row = {"decode_tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
           "new_tokens": [len(r.token_ids) for r in runs]}
    stats = [r.timings.get("speculation") for r in runs if r.timings.get("speculation")]
    if stats:
        drafted, accepted = sum(s["drafted"] for s in stats), sum(s["accepted"] for s in stats)
        steps = sum(s["verify_steps"] + s["plain_steps"] for s in stats)
        row["speculation"] = {"acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
                              "tokens_per_model_step": round((accepted + steps) / steps, 3) if steps else 0.0}
    return row


def transformers_peer(args, prompts: dict) -> dict:
    """transformers from the same GGUF, fp32 on the CPU: greedy with and without prompt lookup."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(args.threads)
    gguf = Path(args.gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    out = {}
    for kind, texts in prompts.items():
        rows = {}
        for name, extra in (("plain", {}), ("prompt_lookup", {"prompt_lookup_num_tokens": 10})):
            tokens = seconds = 0.0
            for text in texts:
                ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              return_tensors="pt")
                ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
                with torch.no_grad():
                    started = time.perf_counter()
                    model.generate(ids, max_new_tokens=1, do_sample=False)
                    first = time.perf_counter() - started
                    started = time.perf_counter()
                    new = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, **extra)
                    total = time.perf_counter() - started
                n = new.shape[1] - ids.shape[1]
                tokens += n - 1
                seconds += max(total - first, 1e-9)
            peer_row(rows, "transformers", kind, name, tokens, seconds)
        out[kind] = with_ratio(rows)
    return out


def llamacpp_peer(args, encoded: dict) -> dict:
    """llama.cpp (llama-cpp-python) on a GGUF of the same weights, greedy, our prompt ids: plain and with its
    prompt-lookup decoding (LlamaPromptLookupDecoding, 10 tokens drafted)."""
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    out = {}
    for kind, prompt_ids in encoded.items():
        rows = {}
        for name, draft in (("plain", None), ("prompt_lookup", LlamaPromptLookupDecoding(num_pred_tokens=10))):
            llm = Llama(model_path=args.llamacpp_gguf, n_ctx=2048, n_threads=args.threads, draft_model=draft,
                        verbose=False)
            tokens = seconds = 0.0
            for ids in prompt_ids:
                n, first = 0, None
                for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                    n += 1
                    first = first or time.perf_counter()
                    if token == llm.token_eos() or n >= args.new_tokens:
                        break
                tokens, seconds = tokens + n - 1, seconds + time.perf_counter() - first
            peer_row(rows, "llama.cpp", kind, name, tokens, seconds)
        out[kind] = with_ratio(rows)
    return out


def peer_row(rows: dict, peer: str, kind: str, name: str, tokens: float, seconds: float) -> None:
    rows[name] = {"decode_tokens_per_s": round(tokens / seconds, 2)}
    print(f"  {peer} {kind:5} {name:13} {rows[name]['decode_tokens_per_s']:8.1f} tok/s", file=sys.stderr, flush=True)


def with_ratio(rows: dict) -> dict:
    """A peer's rows with prompt lookup's speed-up over its own plain decoding."""
    rows["prompt_lookup"]["vs_plain"] = round(rows["prompt_lookup"]["decode_tokens_per_s"]
                                              / rows["plain"]["decode_tokens_per_s"], 3)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--draft", help="a draft bundle (e.g. the same model calibrated w4a16)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--draft-tokens", type=int, default=8)
    p.add_argument("--modes", default="plain,ngram,draft")
    p.add_argument("--gguf", help="run transformers (plain and prompt lookup) from this GGUF too")
    p.add_argument("--llamacpp-gguf", help="run llama.cpp (llama-cpp-python, plain and its prompt-lookup decoding) "
                                           "on this GGUF too (e.g. the F32 one scripts/bench_peers.py writes)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    for given in (args.gguf, args.llamacpp_gguf):
        if given and not Path(given).is_file():
            p.error(f"no GGUF file at {given}")
    args.modes = set(args.modes.split(",")) | {"plain"}
    prompts = {k: v for k, v in json.loads(PROMPTS.read_text()).items() if k in ("copy", "open")}
    result = {"bundle": args.bundle, "draft": args.draft, "device": args.device, "threads": args.threads,
              "new_tokens": args.new_tokens}
    result["ours"], encoded = ours(args, prompts)
    if args.gguf:
        result["transformers"] = transformers_peer(args, prompts)
    if args.llamacpp_gguf:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama.cpp peer skipped: pip install llama-cpp-python", file=sys.stderr)
        else:
            result["llamacpp"] = llamacpp_peer(args, encoded)
    text = json.dumps(result, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
