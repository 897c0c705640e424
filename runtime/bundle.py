"""The bundle format: manifest.json (one reader, one writer) and the files it names. The runtime reads
nothing else; export and calibration write manifests through `write_manifest` only.

Versions (FORMAT_VERSION is what export writes; every version in READS is read):
  1  the first format
  2  the ONNX Runtime graph declares a `next_token` output (its own argmax, the one copy a greedy GPU step
     makes), and image bundles name what their images are conditioned on (image.condition: class,
     caption or prompt). A version-1 manifest is read as version 2: the runtime looks at a graph's
     declared outputs, and a version-1 image section gets its condition from the keys it has.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import manifest_checks
from .errors import BundleError, UserError  # noqa: F401  (BundleError lives in errors.py: paths.py raises it too)

FORMAT = "ardeploy-bundle"
FORMAT_VERSION = 2          # the newest bundle format: what export writes
READS = (1, 2)              # the versions this runtime reads
MANIFEST = "manifest.json"
# calibration scheme -> the TensorRT precision that builds it (engines/builder.py, runtime/engine_record.py)
SCHEME_PRECISION = {"w8a16": "int8", "w8a8": "int8", "w4a16": "int4"}


def device_numerics(manifest: dict) -> dict[str, str]:
    """What arithmetic a quantized bundle's linear layers run on each device (empty for float bundles): the
    same bundle does not compute the same numbers on the CPU and the GPU, and a user must know which.
    ONNX Runtime turns weight-only DequantizeLinear -> MatMul into MatMulNBits on both; its CPU kernel then
    rounds the activations to int8 per block of 32 (accuracy level 4, its default and its fast path), its
    CUDA kernel has no such level and multiplies float activations. SmolLM2 fp16 on an H200, ten greedy
    answers of 48 tokens, CPU vs GPU identical: 9 of 10 in fp16, 5 (w4a16 RTN) and 4 (w8a16)."""
    q = manifest.get("quantization") if isinstance(manifest, dict) else None
    if not isinstance(q, dict) or q.get("scheme") not in SCHEME_PRECISION:
        return {}
    dtype = manifest.get("dtype", "float")
    weights = SCHEME_PRECISION[q["scheme"]]
    if q.get("activations"):
        both = f"{weights} weights x int8 activations (static per-tensor scales: the graph rounds them)"
        return {"cpu": both, "cuda": both}
    return {"cpu": f"{weights} weights x activations rounded to int8 per block of 32 (ONNX Runtime's MatMulNBits, "
                   f"accuracy level 4)",
            "cuda": f"{weights} weights x {dtype} activations (ONNX Runtime's CUDA MatMulNBits)"}


def image_condition(image: dict) -> str:
    """What an image bundle's images are conditioned on: "class" (LlamaGen c2i), "caption" (t2i) or
    "prompt" (Emu3, Emu3.5); stated by version 2, derived from the section's keys for version 1."""
    if "condition" in image:
        return image["condition"]
    return "class" if "class_conditional" in image else "caption" if "caption" in image else "prompt"


def read_manifest(folder: Path) -> dict:
    """The parsed, checked manifest of a bundle folder, as the newest version (see the module docstring)."""
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder")
    if not mpath.exists():
        raise BundleError(f"{folder}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: not an ardeploy bundle manifest")
    version = manifest.get("format_version")
    if version not in READS:
        raise BundleError(f"{mpath}: bundle format version {version!r}, this ardeploy reads versions "
                          f"{', '.join(map(str, READS))}: upgrade ardeploy or re-export the bundle")
    problem = manifest_problem(manifest)
    if problem:
        raise BundleError(f"{mpath}: {problem}")
    if isinstance(manifest.get("image"), dict):
        manifest["image"]["condition"] = image_condition(manifest["image"])
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write manifest.json as the newest format version (export and calibration call only this)."""
    manifest["format"], manifest["format_version"] = FORMAT, FORMAT_VERSION
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")


@dataclass(frozen=True)
class GraphEntry:
    """One graph of a bundle as manifest.json describes it."""
    kind: str
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    flavor: str                      # "ort" (the ONNX Runtime graph) or "portable"
    raw: dict                        # the entry itself (shapes, kv layout)

    @classmethod
    def of(cls, kind: str, entry: dict) -> "GraphEntry":
        return cls(kind, entry["file"], tuple(x["name"] for x in entry.get("inputs", [])),
                   tuple(x["name"] for x in entry.get("outputs", [])), entry.get("flavor", "portable"), entry)


def numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes  # ships with onnx
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _graph_problem(kind, graph) -> str | None:
    if not isinstance(graph, dict) or not isinstance(graph.get("file"), str) or not graph["file"]:
        return f"graphs.{kind} must be an object with a file name"
    for side in ("inputs", "outputs"):
        io = graph.get(side, [])
        if not isinstance(io, list) or not all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in io):
            return f"graphs.{kind}.{side} must be a list of objects with a name"
    return None


def manifest_problem(manifest: dict) -> str | None:
    """What makes a manifest unusable (a missing key, a value of the wrong type), or None."""
    graphs, weights, spec = manifest.get("graphs"), manifest.get("weights"), manifest.get("spec")
    if not isinstance(graphs, dict):
        return "'graphs' is missing or not an object of graphs"
    for kind, graph in graphs.items():
        if problem := _graph_problem(kind, graph):
            return problem
    if not isinstance(weights, dict) or not isinstance(weights.get("file"), str) or not weights["file"]:
        return "'weights' is missing or has no file name"
    if "bytes" in weights and not (isinstance(weights["bytes"], int) and weights["bytes"] >= 0):
        return f"weights.bytes must be a byte count (got {weights['bytes']!r})"
    if not isinstance(spec, dict):
        return "'spec' is missing or not an object"
    bad = [k for k in ("n_layers", "vocab_size", "n_kv_heads", "head_dim") if not _positive_int(spec.get(k))]
    if bad:
        return f"spec.{bad[0]} must be a positive integer (got {spec.get(bad[0])!r})"
    bad = [k for k in ("max_seq", "max_batch") if not _positive_int(manifest.get(k))]
    if bad:
        return f"{bad[0]} must be a positive integer (got {manifest.get(bad[0])!r})"
    try:
        if not isinstance(manifest.get("kv_dtype"), str):
            raise TypeError
        numpy_dtype(manifest["kv_dtype"])
    except (TypeError, ValueError):
        return f"kv_dtype {manifest.get('kv_dtype')!r} is not a known dtype"
    if manifest.get("tokenizer") is not None and not isinstance(manifest["tokenizer"], str):
        return f"tokenizer must be a file name or null (got {manifest['tokenizer']!r})"
    if not isinstance(manifest.get("special_tokens", {}), dict):
        return "special_tokens must be an object"
    return None


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path) -> "Bundle":
        path = Path(path)
        manifest = read_manifest(path)
        manifest_checks.check_manifest(path, manifest)      # files inside the folder, sane bounds
        bundle = cls(path, manifest)
        missing = [name for name in bundle.required_files() if not (path / name).exists()]
        if missing:
            raise BundleError(f"{path}: missing file(s) named in manifest.json: {', '.join(missing)}")
        manifest_checks.check_graphs(path, manifest)       # the graphs' external data and rotary tables
        bundle.check_weights_size()
        return bundle

    def check_weights_size(self) -> None:
        """weights.bin must be exactly as long as the manifest says: a short file would be read past its end."""
        expected = self.manifest["weights"].get("bytes")
        size = self.weights_path.stat().st_size
        if expected is not None and size != expected:
            how = "truncated" if size < expected else "extra data"
            raise BundleError(f"{self.weights_path}: {size} bytes, but manifest.json says {expected} bytes "
                              f"({how}; re-export or copy the bundle again)")

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

    def graph(self, kind: str) -> GraphEntry:
        graphs = self.manifest["graphs"]
        if kind not in graphs:
            raise BundleError(f"{self.path}: bundle has no {kind} graph (it has: {', '.join(graphs)})")
        return GraphEntry.of(kind, graphs[kind])

    @property
    def graph_kinds(self) -> list[str]:
        return list(self.manifest["graphs"])

    def graph_path(self, kind: str) -> Path:
        graphs = self.manifest["graphs"]
        if kind not in graphs:
            raise BundleError(f"{self.path}: bundle has no {kind} graph (it has: {', '.join(graphs)})")
        return self.path / graphs[kind]["file"]

    def has_graph(self, kind: str) -> bool:
        return kind in self.manifest["graphs"]

    def kv_layout(self, graph: str) -> str:
        """"time" ([T, B, n_kv, hd]) or "batch" ([B, n_kv, T, hd]): the cache layout `graph` reads,
        from its manifest entry (or the bundle's, for the portable graphs)."""
        entry = self.manifest["graphs"].get(graph, {}).get("kv_layout") or self.manifest.get("kv_layout") or {}
        return "batch" if (entry.get("order") or ["time"])[0] == "batch" else "time"

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
        path = self.path / self.manifest["tokenizer"]
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:                       # tokenizers raises plain Exception for a bad file
            raise BundleError(f"{path}: not a tokenizers file ({' '.join(str(e).split())[:200]})") from None
