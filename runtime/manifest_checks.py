"""Checks of a bundle's manifest beyond its types (bundle.manifest_problem): the files it names stay
inside the bundle folder, its values lie within sane bounds, and they agree with its graphs.

A manifest is edited by hand or damaged now and then; each disagreement found here would otherwise
surface deep inside a run (a binding of `past.2.key` that no graph has, a rotary table read past its
end, a cache of 10**12 positions asked of the allocator), or read files outside the bundle.

    check_manifest(folder, manifest)     from Bundle.load: raises BundleError naming the field
    check_kv_memory(bundle, what)        before a generator allocates its cache on the host
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import BundleError, UserError
from .paths import inside

# Far beyond any model ardeploy exports, yet small enough that nothing sized by them is absurd.
BOUNDS = {"spec.n_layers": 1024, "spec.n_kv_heads": 1024, "spec.head_dim": 4096, "spec.vocab_size": 1 << 24,
          "max_seq": 1 << 24, "max_batch": 4096}
KV_NAME = re.compile(r"^(past|present)\.(\d+)\.(key|value)$")


def file_entries(manifest: dict) -> dict[str, str]:
    """Every file the manifest names, by the field naming it."""
    files = {f"graphs.{kind}.file": graph["file"] for kind, graph in manifest["graphs"].items()}
    files["weights.file"] = manifest["weights"]["file"]
    if manifest.get("tokenizer"):
        files["tokenizer"] = manifest["tokenizer"]
    caption = ((manifest.get("image") or {}).get("caption") or {}) if isinstance(manifest.get("image"), dict) else {}
    if isinstance(caption, dict) and caption.get("uncond_file"):
        files["image.caption.uncond_file"] = caption["uncond_file"]
    quantization = manifest.get("quantization")
    if isinstance(quantization, dict) and quantization.get("calibration"):
        files["quantization.calibration"] = quantization["calibration"]
    return files


def check_manifest(folder: Path, manifest: dict) -> None:
    """Refuse (BundleError naming manifest.json and the field) what would read outside `folder`, go
    beyond the bounds, or disagree with the graphs' declared inputs and outputs."""
    where = f"{Path(folder) / 'manifest.json'}:"
    for field, name in file_entries(manifest).items():
        inside(folder, name, f"{where} {field}")
    problem = _bounds_problem(manifest) or _tokens_problem(manifest) or _layers_problem(manifest)
    if problem:
        raise BundleError(f"{where} {problem}")


def _value(manifest: dict, field: str):
    node = manifest
    for part in field.split("."):
        node = node[part]
    return node


def _bounds_problem(manifest: dict) -> str | None:
    for field, bound in BOUNDS.items():
        value = _value(manifest, field)
        if value > bound:
            return f"{field} {value} is beyond any model's ({bound} at most): the manifest is damaged"
    return None


def _token_ids_problem(value, name: str, vocab: int) -> str | None:
    ids = value if isinstance(value, list) else [value]
    bad = [v for v in ids if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < vocab]
    if bad:
        return f"special_tokens.{name} must be token ids in [0, {vocab}) (got {bad[0]!r})"
    return None


def _tokens_problem(manifest: dict) -> str | None:
    specials, vocab = manifest.get("special_tokens") or {}, manifest["spec"]["vocab_size"]
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if specials.get(name) is not None and (problem := _token_ids_problem(specials[name], name, vocab)):
            return problem
    template = manifest.get("chat_template")
    if template is not None and not isinstance(template, str):
        return f"chat_template must be a Jinja template string or null (got {type(template).__name__})"
    return None


def _layers_problem(manifest: dict) -> str | None:
    """Each graph's KV inputs and outputs (as the manifest lists them) must be n_layers of each, in
    the spec's shape: check_io then holds the graph files to the same lists."""
    spec = manifest["spec"]
    for kind, graph in manifest["graphs"].items():
        for side in ("inputs", "outputs"):
            layers = {}
            for entry in graph.get(side, []):
                if match := KV_NAME.match(entry["name"]):
                    layers.setdefault(match[1], set()).add(int(match[2]))
                    if problem := _kv_shape_problem(entry, spec, f"graphs.{kind}.{side}"):
                        return problem
            for prefix, found in layers.items():
                if found != set(range(spec["n_layers"])):
                    return (f"spec.n_layers {spec['n_layers']} disagrees with graphs.{kind}.{side}, which has "
                            f"{prefix}.* for {len(found)} layer(s)")
    return None


def _kv_shape_problem(entry: dict, spec: dict, where: str) -> str | None:
    shape = entry.get("shape") or []
    known = [d for d in shape[:-1] if isinstance(d, int)]
    if shape and isinstance(shape[-1], int) and (shape[-1] != spec["head_dim"] or spec["n_kv_heads"] not in known):
        return (f"{where} {entry['name']} has shape {entry['shape']}, but spec says n_kv_heads "
                f"{spec['n_kv_heads']} and head_dim {spec['head_dim']}")
    return None


# -- the graphs themselves -----------------------------------------------------------------------
def check_graphs(folder: Path, manifest: dict) -> None:
    """check_graph on every graph the manifest names (read without weights: a few ms each)."""
    import onnx
    for kind, graph in manifest["graphs"].items():
        path = Path(folder) / graph["file"]
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:                       # protobuf's DecodeError and friends: a damaged file
            raise BundleError(f"{path}: not an ONNX graph ({' '.join(str(e).split())[:200]})") from None
        check_graph(folder, manifest, kind, model)


def check_graph(folder: Path, manifest: dict, kind: str, model) -> None:
    """A loaded graph (onnx.ModelProto, without its weights) of the bundle: its external data must
    lie inside the bundle folder, and a rotary table (GroupQueryAttention's cos_cache) must cover
    the manifest's max_seq positions."""
    path = Path(folder) / manifest["graphs"][kind]["file"]
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                inside(path.parent, entry.value, f"{path}: external data of {tensor.name}")
    positions = _rotary_positions(model)
    if positions is not None and manifest["max_seq"] > positions:
        raise BundleError(f"{Path(folder) / 'manifest.json'}: max_seq {manifest['max_seq']} exceeds the "
                          f"{positions} positions of {path.name}'s rotary table (the manifest was edited, or "
                          f"belongs to another export)")


def _rotary_positions(model) -> int | None:
    tables = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and len(node.input) > 7 and node.input[7] in tables:
            return int(tables[node.input[7]].dims[0])
    return None


# -- memory --------------------------------------------------------------------------------------
def kv_cache_bytes(manifest: dict, batch: int | None = None) -> int:
    """Bytes of the KV arena a generator allocates for the bundle (max_batch rows unless `batch`)."""
    import numpy as np
    spec = manifest["spec"]
    rows = manifest["max_batch"] if batch is None else batch
    per_layer = manifest["max_seq"] * rows * spec["n_kv_heads"] * spec["head_dim"]
    itemsize = 2 if manifest["kv_dtype"] == "bfloat16" else np.dtype(manifest["kv_dtype"]).itemsize
    return 2 * spec["n_layers"] * per_layer * itemsize


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_kv_memory(manifest: dict, bundle_path, batch: int | None = None) -> None:
    """A host KV cache larger than this machine's memory is refused before it is allocated."""
    need, have = kv_cache_bytes(manifest, batch), host_memory_bytes()
    if have and need > have:
        raise UserError(f"{bundle_path}: its KV cache needs {need / 2**30:.1f} GiB (max_seq {manifest['max_seq']} x "
                        f"max_batch {manifest['max_batch']} x {manifest['spec']['n_layers']} layers), more than this "
                        f"machine's {have / 2**30:.1f} GiB: re-export with a smaller --max-seq or --max-batch")
