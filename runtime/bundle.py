"""Read a bundle: manifest.json and the files it names. The runtime reads nothing else."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

FORMAT_VERSION = 1          # the newest bundle format this runtime reads (export writes it)


class BundleError(UserError):
    """A bundle we cannot use; the message names the file or field at fault."""


def numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes  # ships with onnx
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        path = Path(path)
        mpath = path / "manifest.json"
        if not path.is_dir():
            raise BundleError(f"{path}: no such bundle folder")
        if not mpath.exists():
            raise BundleError(f"{path}: not a bundle (no manifest.json)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BundleError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != "ardeploy-bundle":
            raise BundleError(f"{mpath}: not an ardeploy bundle manifest")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise BundleError(f"{mpath}: bundle format version {version!r}, this ardeploy reads up to "
                              f"{FORMAT_VERSION}: upgrade ardeploy or re-export the bundle")
        bundle = cls(path, manifest)
        missing = [name for name in bundle.required_files() if not (path / name).exists()]
        if missing:
            raise BundleError(f"{path}: missing file(s) named in manifest.json: {', '.join(missing)}")
        return bundle

    def required_files(self) -> list[str]:
        manifest = self.manifest
        files = [graph["file"] for graph in manifest["graphs"].values()] + [manifest["weights"]["file"]]
        return files + ([manifest["tokenizer"]] if manifest.get("tokenizer") else [])

    # -- facts the runtime needs ------------------------------------------------------------
    @property
    def spec(self) -> dict:
        return self.manifest["spec"]

    @property
    def n_layers(self) -> int:
        return self.spec["n_layers"]

    @property
    def vocab_size(self) -> int:
        return self.spec["vocab_size"]

    @property
    def max_seq(self) -> int:
        return self.manifest["max_seq"]

    @property
    def max_batch(self) -> int:
        return self.manifest["max_batch"]

    @property
    def kv_dtype(self):
        return numpy_dtype(self.manifest["kv_dtype"])

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(n_kv_heads, head_dim) of one cache row."""
        return self.spec["n_kv_heads"], self.spec["head_dim"]

    @property
    def eos_ids(self) -> list[int]:
        eos = self.manifest.get("special_tokens", {}).get("eos_token_id") or []
        return [eos] if isinstance(eos, int) else list(eos)

    @property
    def pad_id(self) -> int:
        pad = self.manifest.get("special_tokens", {}).get("pad_token_id")
        if pad is None:
            pad = (self.eos_ids or [0])[0]
        return int(pad)

    def graph_path(self, kind: str) -> Path:
        graphs = self.manifest["graphs"]
        if kind not in graphs:
            raise BundleError(f"{self.path}: bundle has no {kind} graph (it has: {', '.join(graphs)})")
        return self.path / graphs[kind]["file"]

    def has_graph(self, kind: str) -> bool:
        return kind in self.manifest["graphs"]

    @property
    def ort_graph(self) -> str | None:
        """The graph of the ONNX Runtime flavor (fused attention, cache updated in place), if the bundle has one."""
        return next((kind for kind, g in self.manifest["graphs"].items() if g.get("flavor") == "ort"), None)

    @property
    def weights_path(self) -> Path:
        return self.path / self.manifest["weights"]["file"]

    def tokenizer(self):
        """A `tokenizers.Tokenizer`, or None for bundles without one (image-token models)."""
        if not self.manifest.get("tokenizer"):
            return None
        from tokenizers import Tokenizer
        return Tokenizer.from_file(str(self.path / self.manifest["tokenizer"]))
