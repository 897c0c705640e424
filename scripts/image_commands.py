"""`ardeploy generate-image`: image-token bundles (LlamaGen, Emu3, Emu3.5) -> PNG files.

    ardeploy generate-image B --class-id 207 --cfg 4.0 --top-k 2000 --seed 0 -n 4 --out dogs/
    ardeploy generate-image B2 --prompt "a lighthouse at dusk" --cfg 3.0 --size 256x256 --out img.png

Sampling settings default to the family's published ones (manifest.json "image.defaults").
"""
from __future__ import annotations

import sys
from pathlib import Path


def _size(text: str | None):
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 256x256") from None
    return w, h


def _sampling(defaults: dict, temperature, top_k, top_p, greedy: bool, seed):
    from ardeploy.runtime import SamplingConfig
    pick = lambda v, k, d: v if v is not None else defaults.get(k, d)
    return SamplingConfig(greedy=greedy, temperature=pick(temperature, "temperature", 1.0),
                          top_k=pick(top_k, "top_k", 0), top_p=pick(top_p, "top_p", 1.0), seed=seed)


def _requests(a, gen):
    from ardeploy.runtime.image import ImageRequest
    given = [name for name, v in (("--class-id", a.class_id), ("--prompt", a.prompt), ("--prompt-ids", a.prompt_ids),
                                  ("--caption-features", a.caption_features)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --class-id, --prompt, --prompt-ids or --caption-features")
    from ardeploy.runtime.image import CONDITION_HELP
    wanted = {"class": "--class-id", "caption": "--caption-features"}.get(gen.condition)
    if (wanted or "--prompt") != given[0] and not (wanted is None and given[0] == "--prompt-ids"):
        raise ValueError(CONDITION_HELP[gen.condition])
    if a.num_images < 1:
        raise ValueError(f"-n must be at least 1 (got {a.num_images})")
    if a.class_id is not None:
        conds = [ImageRequest(class_id=c) for c in a.class_id]
    elif a.caption_features is not None:
        import numpy as np
        conds = []
        for f in a.caption_features:
            try:
                conds.append(ImageRequest(caption=np.load(f)))
            except (OSError, ValueError) as e:
                raise ValueError(f"{f}: cannot read caption features ({e})") from None
    else:
        ids = gen.encode_prompt(a.prompt) if a.prompt is not None else _ids(a.prompt_ids)
        conds = [ImageRequest(prompt_ids=ids)]
    return [c for c in conds for _ in range(a.num_images)]


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


def cmd_generate_image(a) -> int:
    from tqdm import tqdm

    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageGenerator, ImageSettings, save_images

    size = _size(a.size)
    out = Path(a.out)
    gen = ImageGenerator.load(a.bundle, backend=a.backend, threads=a.threads, prepack=not a.no_prepack)
    requests = _requests(a, gen)
    if out.suffix.lower() == ".png" and len(requests) > 1:
        raise ValueError(f"--out {out}: {len(requests)} images need a folder, not one .png file")
    defaults = gen.image.get("defaults", {})
    settings = ImageSettings(
        guidance=Guidance(a.cfg if a.cfg is not None else defaults.get("cfg", 1.0), a.cfg_interval, a.cfg_schedule),
        visual=_sampling(defaults.get("visual", {}), a.temperature, a.top_k, a.top_p, a.greedy, a.seed),
        text=_sampling(defaults.get("text", {}), a.text_temperature, a.text_top_k, a.text_top_p, a.greedy, a.seed),
        seed=a.seed, size=size, max_text_tokens=a.max_text_tokens,
        negative_ids=gen.encode_prompt(a.negative_prompt) if a.negative_prompt is not None else None)
    decode = not a.no_decode
    if not decode and not a.save_tokens:
        raise ValueError("--no-decode needs --save-tokens (otherwise nothing would be written)")
    bar = None

    def progress(n: int):
        nonlocal bar
        if bar is None:    # created on the first token, so bad input never leaves an empty bar behind
            w, h = size or gen.default_size
            f = gen.layout.downsample
            bar = tqdm(total=len(requests) * (w // f) * (h // f), desc="image tokens", unit="tok", leave=False)
        bar.update(n)

    try:
        results = gen.generate(requests, settings, progress=progress, decode=decode)
    finally:
        if bar is not None:
            bar.close()
    if a.save_tokens:
        import numpy as np
        codes = [r.codes for r in results if r.codes is not None]
        np.save(a.save_tokens, np.stack(codes) if codes else np.zeros((0, 0, 0), np.int64))
    written = save_images(results, out) if decode else []
    rates = [r.timings.get("image_tokens_per_s", 0.0) for r in results]
    h, w = results[0].codes.shape if results[0].codes is not None else (0, 0)
    print(f"wrote {len(written)} image(s) to {out} ({w}x{h} tokens each, "
          f"{sum(rates) / len(rates):.1f} image tokens/s per batch)", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("generate-image", help="generate images with an image-token bundle (writes PNG files)",
                              description="LlamaGen (class- or caption-conditional), Emu3 and Emu3.5-style bundles: "
                                          "classifier-free guidance, the family's image layout enforced, codes decoded "
                                          "by the bundle's VQ decoder graph.")
    p.add_argument("bundle")
    c = p.add_argument_group("condition (exactly one)")
    c.add_argument("--class-id", type=int, action="append", help="LlamaGen c2i: ImageNet class id (repeatable)")
    c.add_argument("--prompt", help="Emu3 / Emu3.5: text prompt")
    c.add_argument("--prompt-ids", help="Emu3 / Emu3.5: comma-separated prompt token ids (BOS included)")
    c.add_argument("--caption-features", action="append",
                   help="LlamaGen t2i: .npy [L, 2048] flan-t5-xl features of the caption's L tokens (repeatable)")
    p.add_argument("--negative-prompt", help="Emu3: the unconditional prompt of guidance (default: the bundle's)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per condition")
    p.add_argument("--size", help="WIDTHxHEIGHT in pixels, a multiple of the VQ decoder's factor (default: the bundle's)")
    p.add_argument("--out", required=True, help="a .png file (one image) or a folder")
    p.add_argument("--save-tokens", help="also save the codes as a .npy array [N, h, w]")
    p.add_argument("--no-decode", action="store_true", help="tokens only (with --save-tokens)")
    g = p.add_argument_group("guidance")
    g.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off; default: the family's)")
    g.add_argument("--cfg-interval", type=int, default=-1, help="LlamaGen's cfg_interval: guide image tokens 0..N+1 only")
    g.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"])
    s = p.add_argument_group("sampling of image tokens")
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None, help="0 = off (default: the family's)")
    s.add_argument("--top-p", type=float, default=None, help="1.0 = off")
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--seed", type=int, default=None, help="image k of the request draws from seed + k")
    t = p.add_argument_group("text before the image (unified models)")
    t.add_argument("--max-text-tokens", type=int, default=0, help="free text allowed before the image starts")
    t.add_argument("--text-temperature", type=float, default=None)
    t.add_argument("--text-top-k", type=int, default=None)
    t.add_argument("--text-top-p", type=float, default=None)
    p.add_argument("--backend", default="ort", choices=["ort", "trt"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads for ONNX Runtime (default: all)")
    p.add_argument("--no-prepack", action="store_true",
                   help="ONNX Runtime: do not pre-pack weights (less memory, much slower guided decoding)")
    p.set_defaults(func=cmd_generate_image)
