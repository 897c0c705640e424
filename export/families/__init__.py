"""Image-token families: LlamaGen (class- and text-conditional), Emu3 and Emu3.5-style models.

Every family reuses the text exporter (one traced block stamped per layer); a family only changes
the prologue (LlamaGen: class/caption prefix, 2D rotary) and adds what an image needs: the visual
token layout recorded in manifest.json and a VQ decoder graph (`tokens [B, h, w] -> pixels`).

This package holds what the image families share (the checkpoint and VQ-source types); which family
a checkpoint belongs to, and how each one is loaded, exported and verified, is export/registry.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint import Checkpoint, LazyTensor


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
