"""engines.json as the runtime reads it: where it lives, its format, and the rules that refuse a wrong engine.

engines.json is part of the bundle format (`ardeploy build` writes it beside the plan, see
engines/builder.py); the TensorRT backend, `inspect` and `compare` read it through this module.
Pure (json, hashlib): a wrong engine is refused with a clear message before TensorRT is imported
and prints anything of its own.
"""
from __future__ import annotations

import json
from pathlib import Path

from .bundle import SCHEME_PRECISION, Bundle, BundleError
from .files import sha256_file
from .paths import inside

ENGINES_DIR = "engines"
RECORD = "engines.json"
FORMAT = "ardeploy-engines"
FORMAT_VERSION = 1
GRAPH = "decode"       # the bundle graph every engine is built from (see engines/profiles.py for why)
INT8 = "int8"          # a calibrated bundle (Q/DQ graphs); its float parts keep the bundle's dtype
PREFILL, DECODE = "prefill", "decode"      # the engine's two optimization profiles, by name


def engines_dir(bundle: Bundle) -> Path:
    """BUNDLE/engines, refused when it is a symlink leading out of the bundle."""
    return inside(bundle.path, ENGINES_DIR, f"{bundle.path}: the engines folder")


def load(bundle: Bundle) -> dict:
    """The bundle's engines.json, refused when absent, unreadable, of another format or missing a plan."""
    path = engines_dir(bundle) / RECORD
    if not path.exists():
        quantization = bundle.manifest.get("quantization")
        precision = (SCHEME_PRECISION.get(quantization.get("scheme"), INT8) if quantization
                     else bundle.manifest.get("dtype", "fp16"))
        raise BundleError(f"{bundle.path}: no TensorRT engines (build them with `ardeploy build {bundle.path} "
                          f"--precision {precision}`)")
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or rec.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{path}: not an engines record this version of ardeploy reads (rebuild the engines)")
    _check_files(rec, path, bundle)
    missing = [e["file"] for e in rec["engines"] if not (path.parent / e["file"]).exists()]
    if missing:
        raise BundleError(f"{path.parent}: missing engine file(s) named in {RECORD}: {', '.join(missing)}")
    return rec


def _check_files(rec: dict, path: Path, bundle: Bundle) -> None:
    """Every file the record names lies inside the engines folder (graphs: inside the bundle)."""
    engines, layers, graphs = rec.get("engines"), rec.get("layers", {}), rec.get("graphs", {})
    if not isinstance(engines, list) or not all(isinstance(e, dict) for e in engines) \
            or not isinstance(layers, dict) or not isinstance(graphs, dict):
        raise BundleError(f"{path}: engines, layers or graphs is not what ardeploy writes (rebuild the engines)")
    for n, entry in enumerate(engines):
        inside(path.parent, entry.get("file"), f"{path}: engines[{n}].file")
    if "file" in layers:
        inside(path.parent, layers["file"], f"{path}: layers.file")
    for name in graphs:
        inside(bundle.path, name, f"{path}: graphs")


def check_graphs(rec: dict, bundle: Bundle) -> None:
    """Refuse engines built from other graphs or other weights than the bundle now holds."""
    for file, digest in rec["graphs"].items():
        path = Path(bundle.path) / file
        if not path.exists() or sha256_file(path) != digest:
            raise BundleError(f"{bundle.path}: the engines were built from another {file} (its sha256 changed "
                              f"since the build); rebuild them with `ardeploy build`")
    m = bundle.manifest
    if rec["weights"]["bytes"] != m["weights"]["bytes"] or rec.get("source_sha256") != m["source"].get("sha256"):
        raise BundleError(f"{bundle.path}: the engines were built from other weights than the bundle holds; "
                          f"rebuild them with `ardeploy build`")


def check_tensorrt(rec: dict, flavour: str, version: str) -> None:
    """Plans load only in the exact TensorRT flavour and version that built them."""
    built = rec["tensorrt"]
    if built["flavour"] != flavour or built["version"] != version:
        raise BundleError(f"engines were built by {built['label']} but this is "
                          f"{'TensorRT-RTX' if flavour == 'tensorrt_rtx' else 'TensorRT'} {version}; "
                          f"rebuild them with `ardeploy build` (plans only load in the exact version that built them)")


def check_gpu(rec: dict, name: str, cc: str) -> None:
    """TensorRT plans target the GPU model they were built on; RTX plans the compute capabilities asked for."""
    target = rec["target"]
    ccs = target["compute_capability"]
    if ccs == "any":
        return
    if isinstance(ccs, list):
        if cc not in ccs:
            raise BundleError(f"engines were built for compute capability {', '.join(ccs)}; this GPU ({name}) is "
                              f"{cc}: rebuild them (`ardeploy build --compute-capability {cc}`, or none for any)")
        return
    if cc != ccs or name != target["gpu"]:
        raise BundleError(f"engines were built for {target['gpu']} (compute capability {ccs}); this GPU is {name} "
                          f"({cc}): rebuild them on this machine with `ardeploy build`")
