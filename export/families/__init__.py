"""Image-token families: LlamaGen (class- and text-conditional), Emu3 and Emu3.5-style models.

Every family reuses the text exporter (one traced block stamped per layer); a family only changes
the prologue (LlamaGen: class/caption prefix, 2D rotary) and adds what an image needs: the visual
token layout recorded in manifest.json and a VQ decoder graph (`tokens [B, h, w] -> pixels`).

    load_family(path, "llamagen-c2i", image_size=256, vq="vq_ds16_c2i.pt")   # -> ImageCheckpoint
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import Checkpoint, CheckpointError, LazyTensor

FAMILIES = ("llamagen-c2i", "llamagen-t2i", "emu3", "emu3.5")


@dataclass
class VQSource:
    """A VQ decoder to export: which architecture, its configuration and its (lazy) tensors."""
    kind: str                                  # "vq16" (LlamaGen / Janus layout) | "emu3"
    config: dict
    tensors: dict[str, LazyTensor]
    source: str

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config["level_channels" if self.kind == "vq16" else "channel_multiplier"]) - 1)


@dataclass
class ImageCheckpoint(Checkpoint):
    image: dict = field(default_factory=dict)              # manifest.json "image" section known at load time
    vq: VQSource | None = None
    arrays: dict[str, LazyTensor] = field(default_factory=dict)   # written beside the graphs as <name>.npy


def load_family(path: str | Path, family: str, **options) -> ImageCheckpoint:
    path = Path(path)
    if family not in FAMILIES:
        raise CheckpointError(f"unknown --family {family!r} (choose {', '.join(FAMILIES)})")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if family.startswith("llamagen"):
        from .llamagen import load_llamagen
        return load_llamagen(path, family, **options)
    from .emu3 import load_emu3, load_emu35
    return load_emu3(path, **options) if family == "emu3" else load_emu35(path, **options)


def is_emu3_config(cfg: dict) -> bool:
    return "Emu3ForConditionalGeneration" in (cfg.get("architectures") or [])


__all__ = ["FAMILIES", "ImageCheckpoint", "VQSource", "is_emu3_config", "load_family"]
