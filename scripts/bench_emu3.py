"""Seconds per image of an Emu3-shaped model (random weights) with classifier-free guidance: ardeploy
against transformers' own Emu3 generation, on the same weights, one phase per command.

    python scripts/bench_emu3.py PHASE --work DIR [--shape emu3-8b|tiny] [--device cuda|cpu] ...

Phases (each one command, so each fits a 10-minute limit; DIR keeps what the next one needs):
  folder   an `Emu3ForConditionalGeneration` Hugging Face folder in Emu3-Gen's shapes (8.5B parameters:
           Llama 4096 wide, 32 layers, 32 heads / 8 KV heads, 184,622 tokens of which 32,768 visual; the
           default Emu3VQVAE), weights drawn at random (seed 0) on --device, and a tokenizer.json whose
           vocabulary holds Emu3's special tokens, the header digits and the visual tokens
  export   `ardeploy export` of it: fp16, max_seq 8448 (a 720x720 image is 90x90 codes: 8,100 codes, 90 EOL,
           EOF, EOI and the 7-token header), with the VQ decoder
  ours     ardeploy's ImageGenerator on --device: one warm-up image (--warmup-size), then --repeat images of
           --size: seconds split into tokens, VQ decoding and PNG, image tokens/s, how many codes the
           captured step drew itself
  peer     transformers' Emu3ForConditionalGeneration.generate with Emu3's constraint (prefix_allowed_tokens_fn,
           the layout), negative prompt and guidance scale, top-k: --peer-codes codes (a whole 8,100-code image
           does not fit a 10-minute command at this size), eager; --compiled: a static cache, which transformers
           compiles; reported as image tokens/s and seconds per image at that rate (extrapolated, said so)
Results are merged into --json (one file for all phases).

Speed does not depend on the weights' values: guided top-k sampling of random logits gives a uniform-ish
spread of codes, as real weights give some spread; the work per step is the same.

On this CPU, the whole path in about a minute:
    for phase in folder export ours peer; do python scripts/bench_emu3.py $phase --shape tiny --device cpu \
        --work /tmp/e3 --size 64x64 --warmup-size 16x16 --repeat 1 --peer-codes 16 --json /tmp/e3.json; done
A development script: it needs torch and transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

SHAPES = {   # Emu3-Gen's language model; "tiny" runs the same path on a CPU in seconds
    "emu3-8b": dict(text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, max_position_embeddings=9216, rms_norm_eps=1e-5,
                              rope_theta=1e6, tie_word_embeddings=False),
                    vocab=184622, codes=32768, vq=None),
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=9216, rms_norm_eps=1e-5, rope_theta=1e6,
                           tie_word_embeddings=False),
                 vocab=1024, codes=512, vq=dict(embed_dim=4, latent_channels=4, base_channels=32,
                                                 channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[1],
                                                 hidden_size=64, num_attention_heads=2)),
}
SPECIAL_NAMES = ("<|endoftext|>", "<|extra_203|>", "<|extra_204|>", "<|extra_200|>", "<|extra_201|>",
                 "<|image token|>", "<|image start|>", "<|image end|>")
MAX_SEQ = 8448
PROMPT = 24          # prompt tokens (BOS + ordinary ids); the negative prompt is BOS + 4


def say(*parts) -> None:
    print("[bench_emu3]", *parts, flush=True)


def vocabulary(shape: str) -> tuple[dict[str, int], dict[str, int]]:
    """(every token string -> id, the ids Emu3's layout names): ordinary tokens "t{i}", the header's
    digits and '*', Emu3's specials just below the visual tokens, which take the last `codes` ids."""
    size, codes = SHAPES[shape]["vocab"], SHAPES[shape]["codes"]
    first_visual = size - codes
    vocab = {f"t{i}": i for i in range(first_visual)}
    named = {**{str(d): 10 + d for d in range(10)}, "*": 20}
    named.update({name: first_visual - len(SPECIAL_NAMES) + i for i, name in enumerate(SPECIAL_NAMES)})
    for token, i in named.items():
        vocab.pop(f"t{i}")
        vocab[token] = i
    vocab.update({f"<|visual token {c:06d}|>": first_visual + c for c in range(codes)})
    return vocab, named


def phase_folder(args, work: Path) -> dict:
    import torch
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3VQVAEConfig
    shape = SHAPES[args.shape]
    vocab, named = vocabulary(args.shape)
    out = work / "hf"
    if (out / "config.json").exists():
        say(f"{out} exists: kept")
        return {}
    started = time.perf_counter()
    text = {**shape["text"], "vocab_size": shape["vocab"], "bos_token_id": named["<|extra_203|>"],
            "eos_token_id": named["<|extra_204|>"], "pad_token_id": named["<|endoftext|>"]}
    vq = Emu3VQVAEConfig(**(shape["vq"] or {}), codebook_size=shape["codes"])
    config = Emu3Config(vq_config=vq.to_dict(), text_config=text,
                        vocabulary_map={k: v for k, v in vocab.items() if not k.startswith("t")})
    torch.manual_seed(0)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)                     # drawn in fp16 on the GPU: 17 GB, not 34
    try:
        with torch.device(args.device):
            model = Emu3ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default)
    n_params = sum(p.numel() for p in model.parameters())
    partial = work / ".hf.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.add_special_tokens([AddedToken(s, special=True) for s in vocab if s.startswith("<|")])
    tok.save(str(partial / "tokenizer.json"))
    os.replace(partial, out)
    seconds = time.perf_counter() - started
    say(f"{n_params / 1e9:.2f} B parameters drawn on {args.device} and written in {seconds:.0f} s")
    return {"parameters": n_params, "folder_s": round(seconds, 1)}


def phase_export(args, work: Path) -> dict:
    from ardeploy.export.bundle import export_path
    out = work / "bundle"
    if (out / "manifest.json").exists():
        say(f"{out} exists: kept")
        return {}
    started = time.perf_counter()
    export_path(work / "hf", out, dtype="fp16" if args.device == "cuda" else "fp32", max_seq=MAX_SEQ,
                score_graph=False, quiet=False)
    seconds = time.perf_counter() - started
    say(f"exported in {seconds:.0f} s")
    return {"export_s": round(seconds, 1), "max_seq": MAX_SEQ}


def prompts(named: dict) -> tuple[list[int], list[int]]:
    bos = named["<|extra_203|>"]
    return [bos] + [100 + i for i in range(PROMPT - 1)], [bos, 101, 102, 103, 104]


def phase_ours(args, work: Path) -> dict:
    from ardeploy.runtime import SamplingConfig
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageRequest, ImageSettings, save_images
    _, named = vocabulary(args.shape)
    prompt, negative = prompts(named)
    started = time.perf_counter()
    gen = ImageGenerator.load(work / "bundle", device=args.device)
    load_s = time.perf_counter() - started
    say(f"loaded in {load_s:.1f} s: graph {gen.backend.graph}, device {args.device}, "
        f"sampler in the step: {gen.backend.sampler_tail}")

    def image(size: str, seed: int):
        width, height = (int(x) for x in size.split("x"))
        settings = ImageSettings(guidance=Guidance(args.cfg), visual=SamplingConfig(top_k=args.top_k), seed=seed,
                                 size=(width, height), negative_ids=negative)
        result = gen.generate([ImageRequest(prompt_ids=prompt)], settings)[0]
        save_images([result], work / f"image_{seed}.png")
        return result
    image(args.warmup_size, 100)                      # records the captured graphs
    runs = []
    for seed in range(args.repeat):
        t = image(args.size, seed).timings
        runs.append({k: t.get(k) for k in ("seconds", "tokens_s", "decode_s", "png_s", "first_token_s",
                                           "image_tokens_per_s", "codes_drawn_in_step")})
        say(f"  {args.size}: {t['seconds']:.1f} s tokens + {t['decode_s']:.2f} s VQ + {t['png_s']:.2f} s PNG; "
            f"{t['image_tokens_per_s']:,.0f} image tokens/s; {t['codes_drawn_in_step']} codes drawn in the step")
    best = min(runs, key=lambda r: r["seconds"])
    return {"ours": {"size": args.size, "load_s": round(load_s, 1), "runs": runs,
                     "seconds_per_image": round(best["seconds"] + best["decode_s"] + best["png_s"], 2)}}


def emu3_constraint(named: dict, codes_start: int, codes: int, h: int, w: int, start: int):
    """transformers' prefix_allowed_tokens_fn for Emu3's layout: codes, EOL after each row of w."""
    eol, eof, eoi = named["<|extra_200|>"], named["<|extra_201|>"], named["<|image end|>"]
    visual = list(range(codes_start, codes_start + codes))

    def allowed(batch_id, ids):
        n = ids.shape[-1] - start
        if n >= h * (w + 1):
            return [eof] if n == h * (w + 1) else [eoi]
        return [eol] if n % (w + 1) == w else visual
    return allowed


def phase_peer(args, work: Path) -> dict:
    import torch
    from transformers import Emu3ForConditionalGeneration
    vocab, named = vocabulary(args.shape)
    codes_start, codes = SHAPES[args.shape]["vocab"] - SHAPES[args.shape]["codes"], SHAPES[args.shape]["codes"]
    prompt, negative = prompts(named)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    model = Emu3ForConditionalGeneration.from_pretrained(str(work / "hf"), dtype=dtype).to(args.device).eval()
    per_code = 2 ** (len(model.config.vq_config.channel_multiplier) - 1)      # Emu3's VQ: 8 pixels per code
    width, height = (int(x) // per_code for x in args.size.split("x"))
    header = [named["<|image start|>"], *[named[c] for c in f"{height}*{width}"], named["<|image token|>"]]
    ids = torch.tensor([prompt + header], device=args.device)
    neg = torch.tensor([negative + header], device=args.device)
    rows = -(-args.peer_codes // width)
    new_tokens = args.peer_codes + rows - 1            # the codes and the EOLs between their rows
    extra = {"cache_implementation": "static"} if args.compiled else {}

    def run(n):
        return model.generate(ids, negative_prompt_ids=neg, guidance_scale=args.cfg, do_sample=True, top_k=args.top_k,
                              max_new_tokens=n, pad_token_id=named["<|endoftext|>"],
                              prefix_allowed_tokens_fn=emu3_constraint(named, codes_start, codes, height, width,
                                                                        ids.shape[1]), **extra)
    with torch.no_grad():
        run(min(new_tokens, 32))                       # warm-up (and the compile, with a static cache)
        if args.device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = run(new_tokens)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    made = out.shape[1] - ids.shape[1]
    rate = args.peer_codes / seconds
    per_image = (height * width) / rate
    name = "transformers-static-cache" if args.compiled else "transformers-eager"
    say(f"{name}: {made} tokens ({args.peer_codes} codes) in {seconds:.1f} s: {rate:,.1f} image tokens/s; "
        f"{height * width} codes at that rate: {per_image:.0f} s (extrapolated)")
    return {name: {"codes": args.peer_codes, "seconds": round(seconds, 2), "image_tokens_per_s": round(rate, 2),
                   "seconds_per_image_extrapolated": round(per_image, 1)}}


PHASES = {"folder": phase_folder, "export": phase_export, "ours": phase_ours, "peer": phase_peer}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("phase", choices=sorted(PHASES))
    ap.add_argument("--work", required=True, help="folder kept between phases (the HF folder, the bundle)")
    ap.add_argument("--shape", default="emu3-8b", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--size", default="720x720", help="WIDTHxHEIGHT in pixels (8 per code)")
    ap.add_argument("--warmup-size", default="64x64")
    ap.add_argument("--cfg", type=float, default=3.0, help="Emu3's published guidance scale")
    ap.add_argument("--top-k", type=int, default=2048, help="Emu3's published top-k")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--peer-codes", type=int, default=540, help="codes the peer generates (whole rows of 90)")
    ap.add_argument("--compiled", action="store_true", help="peer: a static cache (transformers compiles it)")
    ap.add_argument("--json", help="merge the phase's results into this file")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = PHASES[args.phase](args, work)
    if args.json and result:
        path = Path(args.json)
        merged = json.loads(path.read_text()) if path.exists() else {"shape": args.shape, "device": args.device}
        merged.update(result)
        path.write_text(json.dumps(merged, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
