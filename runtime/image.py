"""Image-token generation: conditioning prefix, guided sampling of the codes, VQ decoding to pixels.

    gen = ImageGenerator.load("BUNDLE")
    results = gen.generate([ImageRequest(class_id=207)] * 4, ImageSettings(guidance=Guidance(4.0), seed=0))
    write_png("dog.png", results[0].image)

One batch holds B images: rows [cond_0 .. cond_{B-1}, uncond_0 .. uncond_{B-1}] in one KV arena
(the unconditional rows only when guidance is on). Every row has its own prompt and cache: LlamaGen's
are the class / null class (or caption / null caption), Emu3's the prompt and the negative prompt,
left-padded to one length. The token sampled for image b is fed to both of its rows. For unified
models (text before the image), the unconditional row is fed padding (attention mask 0: invisible,
and it does not advance that row's positions) until the image begins, so it sees only its own prompt
and the image, as in Emu3.5.

Codes are drawn on the host (guidance.py, sampling.py) or, on CUDA by default, by sampler nodes on
the device (device_sampler.py: the same definitions and per-image random streams), so that only the
sampled ids come back to the host each step. On CUDA those nodes end the step graph itself: a step
replayed as a captured CUDA graph computes the logits and draws the codes in one launch (the first
code, drawn from the prompt's logits, goes through the sampler graph of its own).

Tokens the layout forces (EOL, EOF, EOI, the "H*W" header) are never sampled: they are fed together
with the next sampled token in one decode step (S > 1), and the forced tokens after the last code are
not run at all.

A batch runs in phases (`ImageGenerator._generate_batch`): `_prefill` (token prompts, or caption
features through the backend's `prefill_features`), `_text_before_image` (unified models only), then
`_sample_image` along the layout; `BatchRows` holds the rows' attention mask and feeds both halves.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .backends.base import device_value, sampled_ids
from .bundle import Bundle, BundleError
from .decode import Rows
from .guidance import Guidance, RangeSampler, guide, image_generators
from .image_layout import ImageLayout
from .manifest_checks import check_kv_memory
from .padding import left_pad
from .backends import load_backend
from .run_options import RunOptions
from .sampling import SamplingConfig
from .sessions import open_session, session_options
from .errors import UserError


@dataclass
class ImageRequest:
    """The condition of one image (exactly one of the three, as the bundle's family expects)."""
    class_id: int | None = None              # LlamaGen c2i
    caption: np.ndarray | None = None        # LlamaGen t2i: [L, caption_dim] features of the L valid caption tokens
    prompt_ids: list[int] | None = None      # Emu3 / Emu3.5: prompt ids (BOS included), without any image tokens


@dataclass
class ImageSettings:
    guidance: Guidance = field(default_factory=Guidance)
    visual: SamplingConfig = field(default_factory=SamplingConfig)       # temperature / top_k / top_p of codes
    text: SamplingConfig = field(default_factory=SamplingConfig)         # of free text before the image (unified)
    seed: int | None = None
    size: tuple[int, int] | None = None      # (width, height) in pixels; None: the bundle's default
    negative_ids: list[int] | None = None    # Emu3: the unconditional prompt (default: BOS + manifest uncond_prompt)
    max_text_tokens: int = 0                 # unified models: free text allowed before BOI (then BOI is forced)
    sampler: str = "auto"                    # codes drawn by "host" numpy, or a "device" graph (device_sampler.py);
                                             # auto: the device graph with --device cuda when it expresses the settings


@dataclass
class ImageResult:
    codes: np.ndarray | None                 # [h, w] VQ codes (None: the model ended with EOS before an image)
    token_ids: list[int]                     # everything generated after the prompt (text, header, codes, layout)
    image: np.ndarray | None = None          # uint8 [H, W, 3] once decoded
    timings: dict = field(default_factory=dict)


CONDITION_HELP = {
    "class": "this bundle is class-conditional (LlamaGen c2i): give a class id, not a prompt or caption features",
    "caption": "this bundle is caption-conditional (LlamaGen t2i): give caption features (.npy), not a class id or prompt",
    "prompt": "this bundle takes a text prompt (or prompt ids), not a class id or caption features",
}


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """VQ output [B, 3, H, W] in about [-1, 1] -> uint8 [B, H, W, 3] (float32 arithmetic)."""
    levels = np.clip(np.rint((np.asarray(pixels, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(levels.transpose(0, 2, 3, 1))


def add_image_output(model) -> None:
    """Give the VQ decoder graph (a ModelProto, edited in place) a second output `image`: to_uint8 of
    `pixels` in the same arithmetic (float32, rounding half to even), computed where the decoder runs, so
    that on a GPU only the uint8 image crosses to the host."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), "image/" + name))
        return "image/" + name
    steps = [("Cast", ["pixels"], "float", {"to": TensorProto.FLOAT}),
             ("Add", ["image/float", const("one", 1.0)], "shifted", {}),
             ("Mul", ["image/shifted", const("half", 127.5)], "scaled", {}),
             ("Round", ["image/scaled"], "rounded", {}),
             ("Clip", ["image/rounded", const("lo", 0.0), const("hi", 255.0)], "clipped", {}),
             ("Cast", ["image/clipped"], "levels", {"to": TensorProto.UINT8}),
             ("Transpose", ["image/levels"], "hwc", {"perm": [0, 2, 3, 1]})]
    for op, inputs, out, attrs in steps:
        model.graph.node.append(helper.make_node(op, inputs, ["image/" + out], name="image/" + out, **attrs))
    model.graph.node.append(helper.make_node("Identity", ["image/hwc"], ["image"], name="image/out"))
    model.graph.output.append(helper.make_tensor_value_info("image", TensorProto.UINT8,
                                                            ["batch", "height", "width", 3]))


class BatchRows:
    """The arena rows of one batch of images (a decode primitive, runtime/decode.py, underneath): image b's
    conditional row is b and, with guidance, its unconditional row is n_images + b. Every run's logits
    land in `logits` (and a copy in `trace`, when it is a list)."""

    def __init__(self, backend, arena, n_images: int, guided: bool, pad: int, trace: list | None):
        self.n_images, self.guided, self.pad, self.trace = n_images, guided, pad, trace
        self.n_rows = 2 * n_images if guided else n_images
        self.rows = Rows(backend, arena)
        self.logits = None

    def prefill(self, prompts: list[list[int]]) -> None:
        """Token prompts, one per row, left-padded to one length."""
        self._took(self.rows.start(prompts, self.pad))

    def prefill_features(self, features: np.ndarray, mask: np.ndarray) -> None:
        """Input features [rows, S, dim] instead of tokens (LlamaGen t2i captions)."""
        self._took(self.rows.start_features(features, mask))

    def column(self, token: int) -> np.ndarray:
        """The same token for every image."""
        return np.full(self.n_images, token, np.int64)

    def feed(self, columns: list[np.ndarray], uncond_sees: bool, sample: dict | None = None) -> None:
        """One decode step. columns: S arrays [images], image b's tokens; its unconditional row gets the
        same tokens, or padding (attention mask 0) while it must not see them. sample: the sampler
        inputs of the codes this step's logits give (drawn in the step where the backend can)."""
        ids = np.stack(columns, axis=1).astype(np.int64)              # [images, S]
        real = np.ones_like(ids)
        if self.guided:
            ids = np.concatenate([ids, ids if uncond_sees else np.full_like(ids, self.pad)])
            real = np.concatenate([real, real if uncond_sees else np.zeros_like(real)])
        self._took(self.rows.feed(ids, real, sample))

    def guided_logits(self, lo: int, hi: int, scale: float) -> np.ndarray:
        """Logits [images, hi - lo] of the range [lo, hi), guided by the unconditional rows."""
        cond = self.logits[:self.n_images, lo:hi]
        uncond = self.logits[self.n_images:self.n_rows, lo:hi] if self.guided else None
        return guide(cond, uncond, scale)

    def _took(self, logits) -> None:
        self.logits = logits
        if self.trace is not None:
            self.trace.append(logits[:self.n_rows].copy())


class HostCodes:
    """Codes drawn on the host (guidance.py, sampling.py) from the rows' latest logits."""

    def __init__(self, cfg: SamplingConfig, lo: int, hi: int, rows: BatchRows, rngs: list):
        self.lo, self.hi, self.rows = lo, hi, rows
        self.visual = RangeSampler(cfg, lo, hi, rngs)
        self.in_step = 0

    def prepare(self, scale: float) -> float:
        return scale

    def for_step(self, prepared) -> None:
        return None

    def __call__(self, scale: float) -> np.ndarray:
        return self.visual(self.rows.guided_logits(self.lo, self.hi, scale))


class DeviceCodes:
    """Codes drawn by the sampler nodes (device_sampler.py), from the same inputs either way: inside the
    step that made the logits where the backend's step graph ends in them and the step was replayed,
    else by the sampler graph of its own on the step's logits. `in_step` counts the first kind."""

    def __init__(self, sampler, cfg: SamplingConfig, rows: BatchRows, rngs: list, width: int, step_draws: bool):
        from .device_sampler import SamplerFeeds
        self.sampler, self.rows, self.rngs = sampler, rows, rngs
        self.feeds = SamplerFeeds(cfg, rows.n_images, rows.guided, width)
        self.step_draws, self.in_step = step_draws, 0

    def prepare(self, scale: float) -> dict:
        """The sampler inputs of the next code of each image (its uniforms drawn now)."""
        return self.feeds(scale, self.rngs)

    def for_step(self, feeds: dict) -> dict | None:
        """What the step that makes the next logits is given to draw with."""
        return feeds if self.step_draws else None

    def __call__(self, feeds: dict) -> np.ndarray:
        logits = self.rows.logits
        drawn = sampled_ids(logits)
        if drawn is not None:
            self.in_step += 1
            return drawn
        value = device_value(logits)
        return self.sampler(np.asarray(logits)[:self.rows.n_rows] if value is None else value, feeds)


class ImageGenerator:
    def __init__(self, bundle: Bundle, backend, options: RunOptions | None = None):
        image = bundle.manifest.get("image")
        if not image:
            raise BundleError(f"{bundle.path}: not an image-token bundle (manifest.json has no image section)")
        options = options or RunOptions()
        self.bundle, self.backend, self.threads = bundle, backend, options.threads
        # TensorRT engines run on the GPU whatever the device; device then places only the VQ decoder
        # and the sampler graph.
        self.device = "cuda" if options.device == "cuda" else "cpu"
        self.image = image
        self.family = image.get("family", "?")
        self.layout = ImageLayout.from_manifest(image)
        self.tokenizer = bundle.tokenizer()
        self._vq = None
        self._samplers: dict = {}                 # DeviceSampler sessions by settings
        self._arena = None
        self._uncond_caption = None

    @classmethod
    def load(cls, path, options: RunOptions | None = None, **changes) -> "ImageGenerator":
        """options (runtime/run_options.py; keywords override single fields): device "cpu" or "cuda" for
        the transformer, the sampler graph and the VQ decoder; flavor: which transformer graph ONNX Runtime
        runs (auto: the ONNX Runtime graph when the bundle has one: LlamaGen c2i, Emu3, Emu3.5; else the portable one);
        prepack (on by default) matters here: guidance always runs >= 2 rows, and without pre-packing ONNX
        Runtime re-packs every weight at each M=2 step: 3.5x slower on GPT-B (74 vs 259 ms/step, one
        thread). The cost is a private copy of the weights per session."""
        from .sessions import providers
        options = (options or RunOptions()).replace(**changes)
        bundle = Bundle.load(path)
        if not bundle.manifest.get("image"):
            raise BundleError(f"{path}: not an image-token bundle (manifest.json has no image section)")
        providers(options.where if options.backend == "ort" else "cpu")   # one line, before any session
        if options.backend == "ort" and options.where == "cpu":
            check_kv_memory(bundle.manifest, bundle.path)                  # before a host cache is allocated
        # On the GPU the captured step also draws the codes (device_sampler.py): its graph gets the sampler.
        layout = ImageLayout.from_manifest(bundle.manifest["image"])
        in_step = (layout.lo, layout.hi) if options.where == "cuda" and options.cuda_graph else None
        return cls(bundle, load_backend(bundle, options, sampler_range=in_step), options)

    def close(self) -> None:
        """Free the backend, the sampler and VQ decoder sessions and the arena. Idempotent."""
        if self.backend is not None:
            self.backend.close()
        self.backend, self._arena, self._vq, self._samplers = None, None, None, {}

    def __enter__(self) -> "ImageGenerator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- facts --------------------------------------------------------------------------------------
    @property
    def default_size(self) -> tuple[int, int]:
        per_token = self.layout.downsample          # pixels per token side
        if self.layout.grid:
            return self.layout.grid[1] * per_token, self.layout.grid[0] * per_token
        width, height = self.image.get("default_size") or (32 * per_token, 32 * per_token)
        return int(width), int(height)

    @property
    def condition(self) -> str:
        """What an image is conditioned on: "class" (LlamaGen c2i), "caption" (LlamaGen t2i) or "prompt"."""
        return self.image["condition"]           # stated in the manifest (read_manifest fills it for version 1)

    @property
    def has_decoder(self) -> bool:
        return "vq" in self.image and self.bundle.has_graph("vq_decoder")

    def encode_prompt(self, text: str) -> list[int]:
        """BOS + the text's tokens (the tokenizer adds no specials: Emu3's prompts start with BOS only)."""
        if self.tokenizer is None:
            raise BundleError(f"{self.bundle.path}: the bundle has no tokenizer; pass token ids (--prompt-ids)")
        bos = self.layout.special.get("bos")
        return ([bos] if bos is not None else []) + self.tokenizer.encode(text, add_special_tokens=False).ids

    # -- validation ---------------------------------------------------------------------------------
    def _check(self, req: ImageRequest) -> None:
        given = [kind for kind, value in (("class", req.class_id), ("caption", req.caption),
                                          ("prompt", req.prompt_ids)) if value is not None]
        if given != [self.condition]:
            raise UserError(CONDITION_HELP[self.condition])
        classes = self.image.get("class_conditional")
        if classes:
            if not 0 <= req.class_id < classes["num_classes"]:
                raise UserError(f"class id {req.class_id} is out of range [0, {classes['num_classes']})")
        elif "caption" in self.image:
            caption = self.image["caption"]
            features = np.asarray(req.caption)
            if features.ndim != 2 or features.shape[1] != caption["dim"] or \
                    not 1 <= features.shape[0] <= caption["tokens"]:
                raise UserError(f"caption features must be [L, {caption['dim']}] with 1 <= L <= "
                                f"{caption['tokens']}, got {list(features.shape)}")
        else:
            bad = [token for token in req.prompt_ids if not 0 <= token < self.bundle.vocab_size]
            if bad:
                raise UserError(f"token id {bad[0]} is outside the vocabulary [0, {self.bundle.vocab_size})")
            self.layout.check_prompt(req.prompt_ids)

    # -- generation ---------------------------------------------------------------------------------
    def generate(self, requests: list[ImageRequest], settings: ImageSettings | None = None,
                 progress: Callable[[int], None] | None = None, trace: list | None = None,
                 decode: bool = True) -> list[ImageResult]:
        """Images for `requests`, in batches that fit the bundle's max_batch.

        progress(n): called with the number of image tokens produced at each step (all images of a batch).
        trace: when a list, every step's raw logits [rows, vocab] are appended (tests compare them).
        """
        settings = settings or ImageSettings()
        if not requests:
            raise UserError("no images requested")
        for request in requests:
            self._check(request)
        width, height = settings.size or self.default_size
        h, w = self.layout.tokens_for_size(width, height)
        if decode and not self.has_decoder:
            raise BundleError(f"{self.bundle.path}: the bundle has no VQ decoder graph (export with --vq), "
                              f"so it can produce tokens but not pixels")
        if settings.max_text_tokens and self.layout.kind == "grid":
            raise UserError("free text before the image needs a unified model (Emu3 / Emu3.5)")
        negative = self._negative(settings)
        self._check_length(requests, negative, settings, h, w)
        seed = settings.seed if settings.seed is not None else int(np.random.SeedSequence().entropy % (1 << 31))
        rows_per_image = 2 if settings.guidance.active else 1
        per_batch = max(1, self.bundle.max_batch // rows_per_image)
        if settings.max_text_tokens:
            per_batch = 1          # images leave their text phase at different steps
        results: list[ImageResult] = []
        for start in range(0, len(requests), per_batch):
            chunk = requests[start: start + per_batch]
            rngs = image_generators(seed, start, len(chunk))
            batch = self._generate_batch(chunk, settings, negative, h, w, rngs, progress, trace)
            done = [result for result in batch if result.codes is not None]
            if decode and done:
                decoding = time.perf_counter()
                images = self.decode_codes(np.stack([result.codes for result in done]), as_images=True)
                decode_s = (time.perf_counter() - decoding) / len(done)
                for result, image in zip(done, images):
                    result.image = image
                    result.timings["decode_s"] = round(decode_s, 4)
            results += batch
        return results

    def _negative(self, settings: ImageSettings) -> list[int] | None:
        """The unconditional prompt of prompt-conditioned families (None for LlamaGen)."""
        if self.condition != "prompt" or not settings.guidance.active:
            return None
        neg = settings.negative_ids
        if neg is None:
            bos = self.layout.special.get("bos")
            neg = self.encode_prompt(self.image.get("uncond_prompt", "")) if self.tokenizer else \
                ([bos] if bos is not None else [])
        self.layout.check_prompt(neg, "negative prompt")
        return list(neg)

    def _check_length(self, requests, negative, settings: ImageSettings, h: int, w: int) -> None:
        if self.condition != "prompt":
            return                   # LlamaGen: max_seq is exactly prefix + grid^2, and the size is checked
        longest = max(len(request.prompt_ids) for request in requests)
        if negative is not None:
            longest = max(longest, len(negative))
        need = longest + settings.max_text_tokens + len(self.layout.header(h, w)) + len(self.layout.region(h, w))
        if need > self.bundle.max_seq:
            raise UserError(f"the prompt and a {h}x{w}-token image need {need} positions; the bundle's max_seq is "
                            f"{self.bundle.max_seq} (re-export with a larger --max-seq)")

    def _prompts(self, chunk: list[ImageRequest], guided: bool, negative: list[int] | None, h: int, w: int,
                 unified: bool):
        """Prefill rows (cond, then uncond when guided): token lists; None for LlamaGen t2i (captions)."""
        classes = self.image.get("class_conditional")
        if classes:
            cond = [[classes["token_offset"] + request.class_id] for request in chunk]
            return cond + ([[classes["token_offset"] + classes["null_class"]]] * len(chunk) if guided else [])
        if "caption" in self.image:
            return None
        header = [] if unified else self.layout.header(h, w)
        cond = [list(request.prompt_ids) + header for request in chunk]
        return cond + ([negative + header for _ in chunk] if negative is not None else [])

    def _captions(self, chunk: list[ImageRequest], guided: bool) -> tuple[np.ndarray, np.ndarray]:
        """LlamaGen t2i prefix: features left-padded to the prefix length; the null caption shares the mask."""
        caption = self.image["caption"]
        n_images, length, dim = len(chunk), caption["tokens"], caption["dim"]
        features, mask = left_pad([np.asarray(request.caption, np.float32) for request in chunk], fill=0.0,
                                  length=length, dtype=np.float32)
        if not guided:
            return features, mask
        if self._uncond_caption is None:
            path = self.bundle.path / caption["uncond_file"]
            if not path.exists():
                raise BundleError(f"{self.bundle.path}: missing {caption['uncond_file']} (the null caption)")
            self._uncond_caption = np.load(path).astype(np.float32)
        null = np.broadcast_to(self._uncond_caption, (n_images, length, dim))
        return np.concatenate([features, null]), np.concatenate([mask, mask])

    def _generate_batch(self, chunk: list[ImageRequest], settings: ImageSettings, negative: list[int] | None,
                        h: int, w: int, rngs: list, progress, trace: list | None) -> list[ImageResult]:
        """One batch of images: prefill the conditions, free text first (unified models), then the image."""
        if self._arena is None:
            self._arena = self.backend.new_arena()       # allocated once, re-viewed for each batch
        rows = BatchRows(self.backend, self._arena, len(chunk), settings.guidance.active, self.bundle.pad_id, trace)
        started = time.perf_counter()
        self._prefill(rows, chunk, settings, negative, h, w)
        generated: list[list[int]] = [[] for _ in chunk]
        if settings.max_text_tokens > 0 and self._text_before_image(rows, settings, rngs, generated[0], h, w):
            return [ImageResult(codes=None, token_ids=generated[0],
                                timings={"seconds": round(time.perf_counter() - started, 4)})]
        codes, first_code_at, in_step = self._sample_image(rows, settings, rngs, generated, h, w, progress)
        finished = time.perf_counter()
        n_codes = h * w
        elapsed = finished - first_code_at
        rate = (n_codes - 1) * len(chunk) / elapsed if n_codes > 1 and elapsed > 0 else 0.0
        timings = {"seconds": round(finished - started, 4), "first_token_s": round(first_code_at - started, 4),
                   "image_tokens_per_s": round(rate, 2), "images_in_batch": len(chunk),
                   "tokens_s": round((finished - started) / len(chunk), 4),     # this image's share of the batch
                   "codes_drawn_in_step": in_step}
        return [ImageResult(codes=image_codes.reshape(h, w), token_ids=tokens, timings=dict(timings))
                for image_codes, tokens in zip(codes, generated)]

    def _prefill(self, rows: "BatchRows", chunk, settings: ImageSettings, negative, h: int, w: int) -> None:
        """Every row's prompt (prompt-conditioned families: with the image header unless text may come first)."""
        prompts = self._prompts(chunk, rows.guided, negative, h, w, unified=settings.max_text_tokens > 0)
        if prompts is None:                      # LlamaGen t2i: caption features
            rows.prefill_features(*self._captions(chunk, rows.guided))
        else:
            rows.prefill(prompts)                # fits max_seq: checked for every request up front

    def _text_before_image(self, rows: "BatchRows", settings: ImageSettings, rngs, generated: list[int],
                           h: int, w: int) -> bool:
        """Unified models: free text (one image, conditional row only, image ids excluded) until the model
        opens the image or the text budget is spent (then BOI is forced); then the header, seen by both
        rows. Returns True when the model ended with EOS instead."""
        layout = self.layout
        text = RangeSampler(settings.text, 0, self.bundle.vocab_size, rngs)
        boi = layout.special["boi"]
        for step in range(settings.max_text_tokens + 1):
            if step == settings.max_text_tokens:
                token = boi                                  # the text budget is spent: the image starts
            else:
                logits = np.array(rows.logits[:rows.n_images], np.float32)
                logits[:, layout.lo:layout.hi] = -np.inf
                logits[:, layout.structural] = -np.inf
                token = int(text(logits)[0])
            generated.append(token)
            if token == boi:
                break
            if token in self.bundle.eos_ids:
                return True
            rows.feed([rows.column(token)], uncond_sees=False)
        header = layout.header(h, w)
        generated += header[1:]
        rows.feed([rows.column(token) for token in header], uncond_sees=True)  # from BOI on, uncond sees it too
        return False

    def _sample_image(self, rows: "BatchRows", settings: ImageSettings, rngs, generated: list[list[int]],
                      h: int, w: int, progress) -> tuple[np.ndarray, float, int]:
        """Walk the layout's region: sample each code (guided, inside the visual range), queue the forced
        tokens. Returns the codes [images, h*w], when the first code was sampled and how many codes the
        steps drew themselves."""
        layout = self.layout
        sample = self._code_sampler(settings, rows, rngs)
        n_codes = h * w
        codes = np.zeros((rows.n_images, n_codes), np.int64)
        pending: list[np.ndarray] = []       # tokens not run yet: the last code and the forced ones after it
        index, first_code_at = 0, None
        for slot in layout.region(h, w):
            if slot is not None:             # forced by the layout: never sampled, fed with the next code
                pending.append(rows.column(slot))
                for tokens in generated:
                    tokens.append(slot)
                continue
            prepared = sample.prepare(settings.guidance.scale_at(index, n_codes))
            if pending:
                rows.feed(pending, uncond_sees=True, sample=sample.for_step(prepared))
            sampled = sample(prepared)
            codes[:, index] = sampled - layout.lo
            for tokens, token in zip(generated, sampled):
                tokens.append(int(token))
            index += 1
            pending = [sampled.astype(np.int64)]
            if first_code_at is None:
                first_code_at = time.perf_counter()
            if progress:
                progress(rows.n_images)
        return codes, first_code_at, sample.in_step

    def _code_sampler(self, settings: ImageSettings, rows: "BatchRows", rngs) -> "HostCodes | DeviceCodes":
        """What draws one image token per image from the rows' latest logits: restricted to the visual
        range first, then guided and sampled there (exact, see guidance.py), on the host or by the sampler
        nodes on the backend's device (the same definitions and random streams)."""
        layout = self.layout
        if not self._on_device(settings):
            return HostCodes(settings.visual, layout.lo, layout.hi, rows, rngs)
        from .device_sampler import DeviceSampler
        sampler = self._samplers.get("visual")
        if sampler is None:
            sampler = self._samplers["visual"] = DeviceSampler(layout.lo, layout.hi, self.bundle.vocab_size,
                                                               self.device, self.threads)
        return DeviceCodes(sampler, settings.visual, rows, rngs, layout.hi - layout.lo,
                           step_draws=self.backend.sampler_tail)

    def sampler_seconds(self) -> float:
        """Time spent in the device sampler graphs so far (benchmarks; 0 with the host sampler)."""
        return sum(sampler.seconds for sampler in self._samplers.values())

    def _on_device(self, settings: ImageSettings) -> bool:
        """Whether the codes are drawn by the sampler graph (ImageSettings.sampler)."""
        from .device_sampler import device_supports
        if settings.sampler not in ("auto", "host", "device"):
            raise UserError(f"unknown sampler {settings.sampler!r} (auto, host or device)")
        why_not = device_supports(settings.visual)
        if settings.sampler == "device" and why_not:
            raise UserError(f"the device sampler does not express {why_not}; use the host sampler")
        return settings.sampler == "device" or (settings.sampler == "auto" and self.device == "cuda" and not why_not)

    # -- VQ decoding --------------------------------------------------------------------------------
    def decode_codes(self, codes: np.ndarray, as_images: bool = False) -> np.ndarray:
        """codes int [B, h, w] -> pixels float32 [B, 3, h*f, w*f] through the bundle's VQ decoder graph, or
        with as_images the uint8 images [B, h*f, w*f, 3] (to_uint8 of them, made where the decoder runs)."""
        if not self.has_decoder:
            raise BundleError(f"{self.bundle.path}: the bundle has no VQ decoder graph (export with --vq)")
        codes = np.ascontiguousarray(codes, np.int64)
        codebook = self.image["vq"]["codebook_size"]
        if codes.ndim != 3 or codes.min() < 0 or codes.max() >= codebook:
            raise UserError(f"VQ codes must be [B, h, w] in [0, {codebook})")
        if self._vq is None:
            self._vq = open_session(self.bundle.graph_path("vq_decoder"), session_options(self.threads),
                                    self.device, edit=add_image_output)
        return self._vq.run(["image" if as_images else "pixels"], {"tokens": codes})[0]


def image_paths(out: str | Path, count: int, names: list[str] | None = None) -> list[Path]:
    """Where save_images puts `count` images: `out` itself when it ends in .png (one image), else
    out/<name>.png (names: 000, 001, ... unless given)."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        if count != 1:
            raise UserError(f"{out}: one file name for {count} images; give a folder")
        return [out]
    return [out / f"{name}.png" for name in (names or [f"{index:03d}" for index in range(count)])]


def save_images(results: list[ImageResult], out: str | Path, names: list[str] | None = None) -> list[Path]:
    """PNG files at image_paths(out, ...), the folder made if missing."""
    from .png import write_png
    images = [result for result in results if result.image is not None]
    paths = image_paths(out, len(images), names)
    if paths:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path, result in zip(paths, images):
        started = time.perf_counter()
        write_png(path, result.image)
        result.timings["png_s"] = round(time.perf_counter() - started, 4)
    return paths
