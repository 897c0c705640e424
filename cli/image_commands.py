"""`ardeploy generate-image`: image-token bundles (LlamaGen, Emu3, Emu3.5) -> PNG files.

    ardeploy generate-image B --class-id 207 --cfg 4.0 --top-k 2000 --seed 0 -n 4 --out dogs/
    ardeploy generate-image B2 --prompt "a lighthouse at dusk" --cfg 3.0 --size 256x256 --out img.png

Sampling settings default to the family's published ones (manifest.json "image.defaults").
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ardeploy.runtime.text import check_text

from .errors import UserError
from .options import (add_backend_threads, add_device, add_flavor, add_json, add_out_force, add_token_filters,
                      add_verbosity, run_options)


def _size(text: str | None):
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 256x256") from None
    return w, h


def _sampling(defaults: dict, temperature, top_k, top_p, greedy: bool, seed):
    from ardeploy.runtime import SamplingConfig
    pick = lambda v, k, d: v if v is not None else defaults.get(k, d)
    return SamplingConfig(greedy=greedy, temperature=pick(temperature, "temperature", 1.0),
                          top_k=pick(top_k, "top_k", 0), top_p=pick(top_p, "top_p", 1.0), seed=seed)


def _check_condition(args, gen) -> None:
    """Exactly one condition option, the one the bundle's family takes; -n at least 1."""
    given = [name for name, v in (("--class-id", args.class_id), ("--prompt", args.prompt),
                                  ("--prompt-ids", args.prompt_ids), ("--caption-features", args.caption_features))
             if v is not None]
    if len(given) != 1:
        raise UserError("give exactly one of --class-id, --prompt, --prompt-ids or --caption-features")
    from ardeploy.runtime.image import CONDITION_HELP
    wanted = {"class": "--class-id", "caption": "--caption-features"}.get(gen.condition)
    if (wanted or "--prompt") != given[0] and not (wanted is None and given[0] == "--prompt-ids"):
        raise UserError(CONDITION_HELP[gen.condition])
    if args.num_images < 1:
        raise UserError(f"-n must be at least 1 (got {args.num_images})")


def _requests(args, gen):
    """One ImageRequest per image: each condition repeated -n times."""
    from ardeploy.runtime.image import ImageRequest
    _check_condition(args, gen)
    if args.class_id is not None:
        conds = [ImageRequest(class_id=c) for c in args.class_id]
    elif args.caption_features is not None:
        import numpy as np
        conds = []
        for f in args.caption_features:
            try:
                conds.append(ImageRequest(caption=np.load(f)))
            except (OSError, ValueError) as e:
                raise UserError(f"{f}: cannot read caption features ({e})") from None
    else:
        ids = gen.encode_prompt(check_text(args.prompt, "--prompt")) if args.prompt is not None else \
            _ids(args.prompt_ids)
        conds = [ImageRequest(prompt_ids=ids)]
    return [c for c in conds for _ in range(args.num_images)]


def _ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


def _settings(args, gen, size):
    """Guidance and sampling: the options given, else the family's defaults from the manifest."""
    from ardeploy.runtime.guidance import Guidance
    from ardeploy.runtime.image import ImageSettings
    defaults = gen.image.get("defaults", {})
    scale = args.cfg if args.cfg is not None else defaults.get("cfg", 1.0)
    return ImageSettings(
        guidance=Guidance(scale, args.cfg_interval, args.cfg_schedule),
        visual=_sampling(defaults.get("visual", {}), args.temperature, args.top_k, args.top_p, args.greedy, args.seed),
        text=_sampling(defaults.get("text", {}), args.text_temperature, args.text_top_k, args.text_top_p,
                       args.greedy, args.seed),
        seed=args.seed, size=size, max_text_tokens=args.max_text_tokens, sampler=args.sampler,
        negative_ids=gen.encode_prompt(check_text(args.negative_prompt, "--negative-prompt"))
        if args.negative_prompt is not None else None)


class _TokenBar:
    """A progress bar of image tokens, created on the first token so that bad input never leaves an empty
    bar behind; nothing is drawn under --quiet."""

    def __init__(self, total: int):
        self.total, self.bar = total, None

    def __call__(self, n: int) -> None:
        from ardeploy.runtime.log import progress_enabled
        if self.bar is None and progress_enabled():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc="image tokens", unit="tok", leave=False)
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_generate_image(args) -> int:
    from ardeploy.runtime.image import ImageGenerator, image_paths, save_images
    size = _size(args.size)
    out = Path(args.out)
    _check_writable(out, "--out", image_paths(out, 1)[0].parent)
    if args.save_tokens:
        _check_writable(Path(args.save_tokens), "--save-tokens", Path(args.save_tokens).parent)
    gen = ImageGenerator.load(args.bundle, run_options(args, prepack=not args.no_prepack))
    requests = _requests(args, gen)
    settings = _settings(args, gen, size)
    decode = not args.no_decode
    if not decode and not args.save_tokens:
        raise UserError("--no-decode needs --save-tokens (otherwise nothing would be written)")
    _check_not_there([*(image_paths(out, len(requests)) if decode else []),    # a .png for several: refused there
                      *([Path(args.save_tokens)] if args.save_tokens else [])], args.force)
    w, h = size or gen.default_size
    factor = gen.layout.downsample
    bar = _TokenBar(len(requests) * (w // factor) * (h // factor))
    try:
        results = gen.generate(requests, settings, progress=bar, decode=decode)
    finally:
        bar.close()
    if args.save_tokens:
        _save_tokens(results, args.save_tokens)
    written = save_images(results, out) if decode else []
    if args.json:
        print(json.dumps({"images": [_image_json(r, path) for r, path in
                                     zip([r for r in results if r.image is not None or not decode], written or
                                         [None] * len(results))]}, indent=1))
        return 0
    rates = [r.timings.get("image_tokens_per_s", 0.0) for r in results]
    h, w = results[0].codes.shape if results[0].codes is not None else (0, 0)
    per_image = [_image_json(r, None)["seconds_per_image"] for r in results]
    print(f"wrote {len(written)} image(s) to {out} ({w}x{h} tokens each, "
          f"{sum(rates) / len(rates):.1f} image tokens/s per batch, {sum(per_image) / len(per_image):.2f} s per "
          f"image: tokens, VQ decode and PNG)", file=sys.stderr)
    return 0


def _check_writable(path: Path, flag: str, folder: Path) -> None:
    """Before any token is generated: `folder` (made later if missing) must be, or be able to become, a
    writable folder, so that a bad path fails now in one line rather than after the images are made."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists() or p.is_symlink())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write there ({existing} is not a writable folder)")


def _check_not_there(paths: list[Path], force: bool) -> None:
    """Files this run would write must not exist yet (a file is replaced only with --force)."""
    there = [path for path in paths if path.exists() or path.is_symlink()]
    if there and not force:
        more = f" and {len(there) - 1} more" if len(there) > 1 else ""
        raise UserError(f"{there[0]}{more}: already there (use --force to replace)")


def _image_json(result, path) -> dict:
    """One image's file and seconds: its share of its batch's token generation, VQ decoding and PNG."""
    t = result.timings
    parts = {"tokens_s": t.get("tokens_s", 0.0), "decode_s": t.get("decode_s", 0.0), "png_s": t.get("png_s", 0.0)}
    return {"file": str(path) if path else None, "tokens": list(result.codes.shape) if result.codes is not None else None,
            **parts, "seconds_per_image": round(sum(parts.values()), 4),
            "image_tokens_per_s": t.get("image_tokens_per_s", 0.0), "images_in_batch": t.get("images_in_batch")}


def _save_tokens(results, path) -> None:
    """The codes as a .npy array, written whole at exactly `path` (np.save would add .npy to a name without it)."""
    import io

    import numpy as np

    from ardeploy.runtime.atomic import write_file_whole
    codes = [r.codes for r in results if r.codes is not None]
    data = io.BytesIO()
    np.save(data, np.stack(codes) if codes else np.zeros((0, 0, 0), np.int64))
    write_file_whole(path, data.getvalue())


def register(sub) -> None:
    p = sub.add_parser("generate-image", help="generate images with an image-token bundle (writes PNG files)",
                       description="LlamaGen (class- or caption-conditional), Emu3 and Emu3.5-style bundles: "
                                   "classifier-free guidance, the family's image layout enforced, codes decoded "
                                   "by the bundle's VQ decoder graph.")
    p.add_argument("bundle")
    condition = p.add_argument_group("condition (exactly one)")
    condition.add_argument("--class-id", type=int, action="append",
                           help="LlamaGen c2i: ImageNet class id (repeatable)")
    condition.add_argument("--prompt", help="Emu3 / Emu3.5: text prompt")
    condition.add_argument("--prompt-ids", help="Emu3 / Emu3.5: comma-separated prompt token ids (BOS included)")
    condition.add_argument("--caption-features", action="append",
                           help="LlamaGen t2i: .npy [L, 2048] flan-t5-xl features of the caption's L tokens "
                                "(repeatable)")
    p.add_argument("--negative-prompt", help="Emu3: the unconditional prompt of guidance (default: the bundle's)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per condition")
    p.add_argument("--size",
                   help="WIDTHxHEIGHT in pixels, a multiple of the VQ decoder's factor (default: the bundle's)")
    add_out_force(p, "a .png file (one image) or a folder (000.png, 001.png, ...)",
                  "replace PNG files (and the --save-tokens file) already there")
    p.add_argument("--save-tokens", help="also save the codes as a .npy array [N, h, w]")
    p.add_argument("--no-decode", action="store_true", help="tokens only (with --save-tokens)")
    add_json(p, "each image's file and seconds (its share of the batch's tokens, VQ decoding, PNG)")
    _add_guidance_and_sampling(p)
    add_backend_threads(p)
    add_device(p)
    add_flavor(p)
    p.add_argument("--no-prepack", action="store_true",
                   help="ONNX Runtime: do not pre-pack weights (less memory, much slower guided decoding)")
    add_verbosity(p)
    p.set_defaults(func=cmd_generate_image)


def _add_guidance_and_sampling(p) -> None:
    guidance = p.add_argument_group("guidance")
    guidance.add_argument("--cfg", type=float, default=None,
                          help="classifier-free guidance scale (1 = off; default: the family's)")
    guidance.add_argument("--cfg-interval", type=int, default=-1,
                          help="LlamaGen's cfg_interval: guide image tokens 0..N+1 only")
    guidance.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"])
    image_sampling = p.add_argument_group("sampling of image tokens")
    add_token_filters(image_sampling, family_defaults=True)
    image_sampling.add_argument("--greedy", action="store_true", help="always take the most likely token")
    image_sampling.add_argument("--seed", type=int, default=None, help="image k of the request draws from seed + k")
    image_sampling.add_argument("--sampler", default="auto", choices=["auto", "host", "device"],
                                help="where codes are drawn: numpy on the host, or sampler nodes on the device "
                                     "(guidance, temperature, top-k; the same draws for a seed; with --device cuda "
                                     "inside the replayed step itself); auto: the device with --device cuda when "
                                     "the settings allow it")
    text_sampling = p.add_argument_group("text before the image (unified models)")
    text_sampling.add_argument("--max-text-tokens", type=int, default=0,
                               help="free text allowed before the image starts")
    add_token_filters(text_sampling, prefix="--text-", family_defaults=True)
