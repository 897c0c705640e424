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

Tokens the layout forces (EOL, EOF, EOI, the "H*W" header) are never sampled: they are fed together
with the next sampled token in one decode step (S > 1), and the forced tokens after the last code are
not run at all.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .bundle import Bundle, BundleError
from .guidance import Guidance, RangeSampler, guide, image_generators
from .image_layout import ImageLayout
from .sampling import SamplingConfig


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
    """VQ output [B, 3, H, W] in about [-1, 1] -> uint8 [B, H, W, 3]."""
    x = np.clip(np.rint((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


class ImageGenerator:
    def __init__(self, bundle: Bundle, backend, threads: int | None = None):
        image = bundle.manifest.get("image")
        if not image:
            raise BundleError(f"{bundle.path}: not an image-token bundle (manifest.json has no image section)")
        self.bundle, self.backend, self.threads = bundle, backend, threads
        self.image = image
        self.family = image.get("family", "?")
        self.layout = ImageLayout.from_manifest(image)
        self.tokenizer = bundle.tokenizer()
        self._vq = None
        self._arena = None
        self._uncond_caption = None

    @classmethod
    def load(cls, path, backend: str = "ort", threads: int | None = None, prepack: bool = True) -> "ImageGenerator":
        """prepack (ONNX Runtime): pre-pack MatMul weights. Guidance always runs >= 2 rows, and without
        pre-packing ONNX Runtime re-packs every weight at each M=2 step: 3.5x slower on GPT-B (74 vs 259
        ms/step, one thread). The cost is a private copy of the weights per session."""
        from .generator import load_backend
        bundle = Bundle.load(path)
        if not bundle.manifest.get("image"):
            raise BundleError(f"{path}: not an image-token bundle (manifest.json has no image section)")
        kw = {"threads": threads, "prepack": prepack} if backend == "ort" else {}
        return cls(bundle, load_backend(bundle, backend, **kw), threads)

    # -- facts --------------------------------------------------------------------------------------
    @property
    def default_size(self) -> tuple[int, int]:
        f = self.layout.downsample
        if self.layout.grid:
            return self.layout.grid[1] * f, self.layout.grid[0] * f
        w, h = self.image.get("default_size") or (32 * f, 32 * f)
        return int(w), int(h)

    @property
    def condition(self) -> str:
        """What an image is conditioned on: "class" (LlamaGen c2i), "caption" (LlamaGen t2i) or "prompt"."""
        return "class" if "class_conditional" in self.image else "caption" if "caption" in self.image else "prompt"

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
        given = [k for k, v in (("class", req.class_id), ("caption", req.caption), ("prompt", req.prompt_ids))
                 if v is not None]
        if given != [self.condition]:
            raise ValueError(CONDITION_HELP[self.condition])
        cc = self.image.get("class_conditional")
        if cc:
            if not 0 <= req.class_id < cc["num_classes"]:
                raise ValueError(f"class id {req.class_id} is out of range [0, {cc['num_classes']})")
        elif "caption" in self.image:
            cap = self.image["caption"]
            c = np.asarray(req.caption)
            if c.ndim != 2 or c.shape[1] != cap["dim"] or not 1 <= c.shape[0] <= cap["tokens"]:
                raise ValueError(f"caption features must be [L, {cap['dim']}] with 1 <= L <= {cap['tokens']}, "
                                 f"got {list(c.shape)}")
        else:
            bad = [t for t in req.prompt_ids if not 0 <= t < self.bundle.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.bundle.vocab_size})")
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
            raise ValueError("no images requested")
        for r in requests:
            self._check(r)
        width, height = settings.size or self.default_size
        h, w = self.layout.tokens_for_size(width, height)
        if decode and not self.has_decoder:
            raise BundleError(f"{self.bundle.path}: the bundle has no VQ decoder graph (export with --vq), "
                              f"so it can produce tokens but not pixels")
        if settings.max_text_tokens and self.layout.kind == "grid":
            raise ValueError("free text before the image needs a unified model (Emu3 / Emu3.5)")
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
            done = [r for r in batch if r.codes is not None]
            if decode and done:
                for r, img in zip(done, to_uint8(self.decode_codes(np.stack([r.codes for r in done])))):
                    r.image = img
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
        longest = max(len(r.prompt_ids) for r in requests)
        if negative is not None:
            longest = max(longest, len(negative))
        need = longest + settings.max_text_tokens + len(self.layout.header(h, w)) + len(self.layout.region(h, w))
        if need > self.bundle.max_seq:
            raise ValueError(f"the prompt and a {h}x{w}-token image need {need} positions; the bundle's max_seq is "
                             f"{self.bundle.max_seq} (re-export with a larger --max-seq)")

    def _prompts(self, chunk: list[ImageRequest], guided: bool, negative: list[int] | None, h: int, w: int,
                 unified: bool):
        """Prefill rows (cond, then uncond when guided): token lists; None for LlamaGen t2i (captions)."""
        cc = self.image.get("class_conditional")
        if cc:
            cond = [[cc["token_offset"] + r.class_id] for r in chunk]
            return cond + ([[cc["token_offset"] + cc["null_class"]]] * len(chunk) if guided else [])
        if "caption" in self.image:
            return None
        header = [] if unified else self.layout.header(h, w)
        cond = [list(r.prompt_ids) + header for r in chunk]
        return cond + ([negative + header for _ in chunk] if negative is not None else [])

    def _captions(self, chunk: list[ImageRequest], guided: bool) -> tuple[np.ndarray, np.ndarray]:
        """LlamaGen t2i prefix: features left-padded to the prefix length; the null caption shares the mask."""
        cap = self.image["caption"]
        T, D = cap["tokens"], cap["dim"]
        B = len(chunk)
        feats = np.zeros((B, T, D), np.float32)
        mask = np.zeros((B, T), np.int64)
        for b, r in enumerate(chunk):
            c = np.asarray(r.caption, np.float32)
            feats[b, T - len(c):] = c
            mask[b, T - len(c):] = 1
        if not guided:
            return feats, mask
        if self._uncond_caption is None:
            path = self.bundle.path / cap["uncond_file"]
            if not path.exists():
                raise BundleError(f"{self.bundle.path}: missing {cap['uncond_file']} (the null caption)")
            self._uncond_caption = np.load(path).astype(np.float32)
        null = np.broadcast_to(self._uncond_caption, (B, T, D))
        return np.concatenate([feats, null]), np.concatenate([mask, mask])

    def _generate_batch(self, chunk, settings, negative, h, w, rngs, progress, trace) -> list[ImageResult]:
        B = len(chunk)
        guided = settings.guidance.active
        R = 2 * B if guided else B
        lay = self.layout
        unified = settings.max_text_tokens > 0
        region = lay.region(h, w)
        n_codes = h * w
        if self._arena is None:
            self._arena = self.backend.new_arena()       # allocated once, re-viewed for each batch
        arena = self._arena
        arena.reset(R)
        pad = self.bundle.pad_id
        visual = RangeSampler(settings.visual, lay.lo, lay.hi, rngs)
        t0 = time.perf_counter()

        prompts = self._prompts(chunk, guided, negative, h, w, unified)
        if prompts is None:                      # LlamaGen t2i: caption features
            feats, mask = self._captions(chunk, guided)
            logits = self._prefill_features(feats, mask, arena)
        else:
            S = max(len(p) for p in prompts)      # fits max_seq: checked for every request up front
            ids = np.full((R, S), pad, np.int64)
            mask = np.zeros((R, S), np.int64)
            for r, p in enumerate(prompts):
                ids[r, S - len(p):] = p
                mask[r, S - len(p):] = 1
            logits = self.backend.step(ids, mask, arena)
        if trace is not None:
            trace.append(logits[:R].copy())

        def step(columns: list[np.ndarray], uncond_sees: bool) -> None:
            """One decode step. columns: S arrays [B], image b's tokens; its unconditional row gets the
            same tokens, or padding (attention mask 0) while it must not see them."""
            nonlocal mask, logits
            x = np.stack(columns, axis=1).astype(np.int64)              # [B, S]
            real = np.ones_like(x)
            if guided:
                x = np.concatenate([x, x if uncond_sees else np.full_like(x, pad)])
                real = np.concatenate([real, real if uncond_sees else np.zeros_like(real)])
            mask = np.concatenate([mask, real], axis=1)
            logits = self.backend.step(x, mask, arena)
            if trace is not None:
                trace.append(logits[:R].copy())

        def forced(token: int) -> np.ndarray:
            return np.full(B, token, np.int64)

        generated: list[list[int]] = [[] for _ in range(B)]
        if unified:
            # Free text first (B == 1, conditional row only, no guidance, image ids excluded) until BOI.
            text = RangeSampler(settings.text, 0, self.bundle.vocab_size, rngs)
            boi = lay.special["boi"]
            for k in range(settings.max_text_tokens + 1):
                if k == settings.max_text_tokens:
                    tok = boi                                    # the text budget is spent: the image starts
                else:
                    x = np.array(logits[:B], np.float32)
                    x[:, lay.lo:lay.hi] = -np.inf
                    x[:, lay.structural] = -np.inf
                    tok = int(text(x)[0])
                generated[0].append(tok)
                if tok == boi:
                    break
                if tok in self.bundle.eos_ids:
                    return [ImageResult(codes=None, token_ids=generated[0],
                                        timings={"seconds": round(time.perf_counter() - t0, 4)})]
                step([forced(tok)], uncond_sees=False)
            header = lay.header(h, w)
            generated[0] += header[1:]
            step([forced(t) for t in header], uncond_sees=True)  # from BOI on, the unconditional row sees it too

        codes = np.zeros((B, n_codes), np.int64)
        feed: list[np.ndarray] = []          # tokens not run yet: the last code and the forced ones after it
        index, t_first = 0, None
        for slot in region:
            if slot is not None:             # forced by the layout: never sampled, fed with the next code
                feed.append(forced(slot))
                for g in generated:
                    g.append(slot)
                continue
            if feed:
                step(feed, uncond_sees=True)
            # Restrict to the visual range first, then guide and sample there (exact, see guidance.py).
            cond = logits[:B, lay.lo:lay.hi]
            uncond = logits[B:R, lay.lo:lay.hi] if guided else None
            toks = visual(guide(cond, uncond, settings.guidance.scale_at(index, n_codes)))
            codes[:, index] = toks - lay.lo
            for b in range(B):
                generated[b].append(int(toks[b]))
            index += 1
            feed = [toks.astype(np.int64)]
            if t_first is None:
                t_first = time.perf_counter()
            if progress:
                progress(B)
        t_end = time.perf_counter()
        rate = (n_codes - 1) * B / (t_end - t_first) if n_codes > 1 and t_end > t_first else 0.0
        timings = {"seconds": round(t_end - t0, 4), "first_token_s": round(t_first - t0, 4),
                   "image_tokens_per_s": round(rate, 2)}
        return [ImageResult(codes=codes[b].reshape(h, w), token_ids=generated[b], timings=dict(timings))
                for b in range(B)]

    def _prefill_features(self, feats: np.ndarray, mask: np.ndarray, arena) -> np.ndarray:
        """LlamaGen t2i prefill: `caption_features` instead of `input_ids`, K/V bound into the arena.

        Backend.step takes token ids only, so this binds the ONNX Runtime session directly.
        """
        be = self.backend
        if getattr(be, "name", None) != "ort":
            raise BundleError("caption-conditioned (LlamaGen t2i) prefill runs on the ort backend only for now")
        sess = be.session("prefill")
        io = sess.io_binding()
        io.bind_cpu_input("caption_features", np.ascontiguousarray(feats, np.float32))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, np.int64))
        S = feats.shape[1]
        for i in range(self.bundle.n_layers):
            for kv, name in ((0, "key"), (1, "value")):
                ptr, shape = arena.region(i, kv, 0, S)
                io.bind_output(f"present.{i}.{name}", be.device, 0, arena.dtype, shape, ptr)
        logits = np.empty((feats.shape[0], self.bundle.vocab_size), np.float32)
        io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        sess.run_with_iobinding(io)
        arena.length = S
        return logits

    # -- VQ decoding --------------------------------------------------------------------------------
    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """codes int [B, h, w] -> pixels float32 [B, 3, h*f, w*f] through the bundle's VQ decoder graph."""
        if not self.has_decoder:
            raise BundleError(f"{self.bundle.path}: the bundle has no VQ decoder graph (export with --vq)")
        codes = np.ascontiguousarray(codes, np.int64)
        n = self.image["vq"]["codebook_size"]
        if codes.ndim != 3 or codes.min() < 0 or codes.max() >= n:
            raise ValueError(f"VQ codes must be [B, h, w] in [0, {n})")
        if self._vq is None:
            import onnxruntime as ort
            so = ort.SessionOptions()
            if self.threads:
                so.intra_op_num_threads = self.threads
            path = self.bundle.graph_path("vq_decoder")
            try:
                self._vq = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            except Exception as e:
                raise BundleError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        return self._vq.run(["pixels"], {"tokens": codes})[0]


def save_images(results: list[ImageResult], out: str | Path, names: list[str] | None = None) -> list[Path]:
    """PNG files: `out` itself when it ends in .png and there is one image, else out/<name>.png."""
    from .png import write_png
    out = Path(out)
    images = [r for r in results if r.image is not None]
    if out.suffix.lower() == ".png":
        if len(images) != 1:
            raise ValueError(f"{out}: one file name for {len(images)} images; give a folder")
        out.parent.mkdir(parents=True, exist_ok=True)
        return [write_png(out, images[0].image)]
    out.mkdir(parents=True, exist_ok=True)
    names = names or [f"{i:03d}" for i in range(len(images))]
    return [write_png(out / f"{name}.png", r.image) for name, r in zip(names, images)]
