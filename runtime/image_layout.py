"""Where image tokens go: the visual-token range and each family's layout of an image in the sequence.

    grid   (LlamaGen)  h*w codes, nothing else; the size is fixed by the bundle's 2D rotary table
    emu3               BOI "H*W" IMG, then H rows of (W codes, EOL), then EOF, EOI
    emu3.5             BOI "H*W" IMG, then H rows of W codes separated by EOL, then EOI

`region(h, w)` lists what follows the header: None where a code is sampled, a token id where the
layout forces one.
"""
from __future__ import annotations

from dataclasses import dataclass

from .bundle import BundleError
from .errors import UserError


@dataclass
class ImageLayout:
    kind: str
    lo: int                         # visual ids are [lo, hi); code = id - lo
    hi: int
    special: dict                   # boi, img, eoi, eol, eof, bos, eos, pad -> id or None
    header_ids: dict                # '0'..'9', '*' -> id
    downsample: int                 # pixels per token side
    grid: tuple[int, int] | None = None      # LlamaGen: the only size (h, w) in tokens

    @classmethod
    def from_manifest(cls, image: dict) -> "ImageLayout":
        try:
            vis = image["visual_tokens"]
            return cls(kind=image["layout"], lo=int(vis["start"]), hi=int(vis["start"]) + int(vis["count"]),
                       special=dict(image.get("special") or {}), header_ids=dict(image.get("header_ids") or {}),
                       downsample=int(image.get("vq", {}).get("downsample") or image.get("downsample") or 16),
                       grid=tuple(image["grid"]) if image.get("grid") else None)
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest.json: malformed image section ({e})") from None

    @property
    def structural(self) -> list[int]:
        """Ids that only belong inside an image (never in a prompt or in free text)."""
        return [self.special[name] for name in ("img", "eoi", "eol", "eof") if self.special.get(name) is not None]

    def tokens_for_size(self, width: int, height: int) -> tuple[int, int]:
        """Pixel size -> (h, w) in tokens, or ValueError when the VQ decoder cannot produce it."""
        per_token = self.downsample
        if width <= 0 or height <= 0 or width % per_token or height % per_token:
            raise UserError(f"image size {width}x{height} is not a multiple of the VQ decoder's {per_token} pixels "
                            f"per token")
        h, w = height // per_token, width // per_token
        if self.grid is not None and (h, w) != tuple(self.grid):
            grid_h, grid_w = self.grid
            raise UserError(f"this bundle makes {grid_w * per_token}x{grid_h * per_token} images only (its 2D rotary "
                            f"table is {grid_h}x{grid_w} tokens); got {width}x{height}")
        return h, w

    def header(self, h: int, w: int) -> list[int]:
        """BOI, the digits of "h*w", IMG (empty for grid layouts)."""
        if self.kind == "grid":
            return []
        return [self.special["boi"]] + [self.header_ids[char] for char in f"{h}*{w}"] + [self.special["img"]]

    def region(self, h: int, w: int) -> list[int | None]:
        if self.kind == "grid":
            return [None] * (h * w)
        eol = self.special["eol"]
        out: list[int | None] = []
        for row in range(h):
            out += [None] * w
            if self.kind == "emu3" or row < h - 1:
                out.append(eol)
        if self.kind == "emu3":
            out.append(self.special["eof"])
        return out + [self.special["eoi"]]

    def check_prompt(self, ids: list[int], what: str = "prompt") -> None:
        """Image tokens are allowed only inside the image the model generates."""
        banned = set(self.structural) | {self.special.get("boi")}
        for token in ids:
            if self.lo <= token < self.hi or token in banned:
                kind = "a visual token" if self.lo <= token < self.hi else "an image layout token"
                raise UserError(f"{what} contains {kind} (id {token}); image tokens are only allowed inside the "
                                f"generated image")
