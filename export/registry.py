"""Model families, one entry each: how a checkpoint is recognised, loaded, exported and verified.

    load_checkpoint(path)                                          # recognised from its files
    load_checkpoint(path, "llamagen-c2i", image_size=256, vq=...)  # named: a bare .pt cannot say
    family_of(ckpt).decoder / .graphs(ckpt) / .transformers_class

Text checkpoints all run the same decoder (Llama and Qwen3 differ only in ModelSpec flags, which the
loader sets), so their entries are per source format: what differs between a Hugging Face folder,
a Meta folder and a GGUF file is how they are read and what `verify` compares them with. Image-token
families have an entry each. Entries are tried in table order when recognising files.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import Checkpoint
from .errors import CheckpointError
from .families.emu3 import is_emu3_folder, load_emu3, load_emu35
from .families.image_export import ImageGraphs, LlamaGenC2IGraphs, LlamaGenT2IGraphs
from .families.llamagen import LlamaGenDecoder, load_llamagen
from .loaders.gguf_file import load_gguf
from .loaders.hf import load_hf
from .loaders.meta import load_meta
from .model import Decoder
from .text_graphs import TextGraphs

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _no_manifest_options(manifest: dict) -> dict:
    return {}


@dataclass(frozen=True)
class Family:
    name: str                                         # manifest "family" (image) or source format (text)
    load: Callable[..., Checkpoint]                   # (path, **options) -> Checkpoint
    recognise: Callable[[Path], bool] | None = None   # None: only `--family NAME` selects it
    named: bool = False                               # `--family NAME` selects it
    options: tuple[str, ...] = ()                     # family options its loader takes (--image-size, ...)
    image: bool = False                               # image-token family: manifest "image"
    graphs_class: type[TextGraphs] = TextGraphs       # what its bundles' graphs are (one class per family)
    decoder: type[Decoder] = Decoder                  # the PyTorch reference (and traced pieces)
    transformers_class: str = "AutoModelForCausalLM"  # what `verify` compares with
    compare_by_default: bool = False                  # `verify` compares with transformers unless told
    options_from_manifest: Callable[[dict], dict] = _no_manifest_options   # `verify` re-reads the source

    def graphs(self, ckpt: Checkpoint, target: str = "ort") -> TextGraphs:
        """What the bundle writer asks about the graphs of this family's bundles (target: see TextGraphs)."""
        return self.graphs_class(ckpt, self.decoder, target)

    def read(self, path: Path, options: dict) -> Checkpoint:
        unknown = [k for k in options if k not in self.options]
        if unknown:
            raise _options_error(self, path, unknown)
        return self.load(path, **options)


def _options_error(family: Family, path: Path, unknown: list[str]) -> CheckpointError:
    flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
    if not family.image:
        return CheckpointError(f"{path}: {flags} only apply to image-token families (--family llamagen-c2i, ...)")
    verb = "does" if len(unknown) == 1 else "do"
    return CheckpointError(f"{flags} {verb} not apply to {family.name} checkpoints "
                           f"(their image layout comes from the checkpoint)")


def _llamagen_options(manifest: dict) -> dict:
    """A bare .pt does not record the image size, the head count or (without --vq) the VQ factor."""
    cfg = manifest["spec"]["extra"]["llamagen"]
    return {"image_size": cfg["image_size"], "n_head": manifest["spec"]["n_heads"], "downsample": cfg["downsample"]}


def _is_gguf_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def _is_meta_folder(path: Path) -> bool:
    return (path / "params.json").exists()


def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").exists()


LLAMAGEN_OPTIONS = ("image_size", "vq", "n_head", "downsample")

FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("gguf", load_gguf, recognise=_is_gguf_file),
    Family("meta", load_meta, recognise=_is_meta_folder),
    Family("llamagen-c2i", functools.partial(load_llamagen, family="llamagen-c2i"), named=True,
           options=LLAMAGEN_OPTIONS, image=True, graphs_class=LlamaGenC2IGraphs, decoder=LlamaGenDecoder,
           options_from_manifest=_llamagen_options),
    Family("llamagen-t2i", functools.partial(load_llamagen, family="llamagen-t2i"), named=True,
           options=LLAMAGEN_OPTIONS, image=True, graphs_class=LlamaGenT2IGraphs, decoder=LlamaGenDecoder,
           options_from_manifest=_llamagen_options),
    # Emu3's LM lives inside the unified model; AutoModelForCausalLM would build a bare LM and
    # initialise its weights at random.
    Family("emu3", load_emu3, recognise=is_emu3_folder, named=True, image=True, graphs_class=ImageGraphs,
           transformers_class="Emu3ForConditionalGeneration", compare_by_default=True),
    Family("hf", load_hf, recognise=_is_hf_folder, compare_by_default=True),     # Llama and Qwen3
    Family("emu3.5", load_emu35, named=True, image=True, graphs_class=ImageGraphs, compare_by_default=True),
)}


def load_checkpoint(path: str | Path, family: str | None = None, **family_options) -> Checkpoint:
    """family: force a family whose checkpoints cannot be recognised from the files alone
    (e.g. "llamagen-c2i" for a bare .pt state dict); family_options go to that family's loader."""
    path = Path(path)
    options = {k: v for k, v in family_options.items() if v is not None}
    chosen = None if family in (None, "auto") else family_named(family)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    try:
        return (chosen or recognised_family(path)).read(path, options)
    except CheckpointError as e:
        if str(path) in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from None      # e.g. "invalid model spec: ...": name the checkpoint


def family_named(name: str) -> Family:
    """The family `--family NAME` selects."""
    named = [f.name for f in FAMILIES.values() if f.named]
    if name not in named:
        raise CheckpointError(f"unknown --family {name!r} (choose {', '.join(named)})")
    return FAMILIES[name]


def recognised_family(path: Path) -> Family:
    """The first family whose files `path` has; one message saying what was expected otherwise."""
    for family in FAMILIES.values():
        if family.recognise is not None and family.recognise(path):
            return family
    if path.is_file():
        if path.suffix in STATE_DICT_SUFFIXES:
            raise CheckpointError(f"{path}: a bare PyTorch state dict: name its family with --family "
                                  f"(llamagen-c2i or llamagen-t2i)")
        raise CheckpointError(f"{path}: expected a .gguf file or a checkpoint folder")
    raise CheckpointError(f"{path}: not a checkpoint folder (no config.json or params.json, no weights)")


def family_of(ckpt: Checkpoint) -> Family:
    """The entry a loaded checkpoint belongs to: its image family, else its source format."""
    found = FAMILIES.get(ckpt.family) or FAMILIES.get(ckpt.source_format)
    if found is None:
        raise CheckpointError(f"{ckpt.source}: no family entry for family {ckpt.family!r} "
                              f"(source format {ckpt.source_format!r})")
    return found


def reread_options(manifest: dict) -> dict:
    """What load_checkpoint needs to read a bundle's source again as the exporter did: nothing for
    families recognised from their files, the family and its options for the others."""
    family = FAMILIES.get(manifest.get("family", ""))
    if family is None or family.recognise is not None:
        return {}
    return {"family": family.name, **family.options_from_manifest(manifest)}
