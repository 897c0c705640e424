"""The FP bundle being calibrated, as calibration reads it: its graphs (without weights), the linear
layers found in them, its weights through one memory map, and the float type of its activations."""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ..runtime.bundle import Bundle, BundleError, numpy_dtype
from .graphs import NP_OF_ONNX, Linear, activation_dtype, find_linears, initializer_map
from ..runtime.errors import UserError


class SourceWeights:
    """Tensors of the source bundle's weights file, read through one memory map. Pages read stay
    resident (and count in the process's RSS) until release(): calibration releases them after each
    layer, so a model larger than memory streams through it."""

    def __init__(self, bundle: Bundle):
        self.dir = Path(bundle.path)
        self.maps: dict[str, np.memmap] = {}

    def raw(self, t: TensorProto) -> memoryview:
        info = {e.key: e.value for e in t.external_data}
        loc = info["location"]
        if loc not in self.maps:
            self.maps[loc] = np.memmap(self.dir / loc, dtype=np.uint8, mode="r")
        off, n = int(info.get("offset", 0)), int(info["length"])
        return self.maps[loc][off: off + n]

    def release(self) -> None:
        """Drop the pages read so far from this process (they stay in the page cache; reading a tensor
        again maps them back). A no-op where madvise is not available."""
        for m in self.maps.values():
            mm = getattr(m, "_mmap", None)
            if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                mm.madvise(mmap.MADV_DONTNEED)

    def array(self, t: TensorProto) -> np.ndarray:
        if t.data_location != TensorProto.EXTERNAL:
            return onnx.numpy_helper.to_array(t)
        dt = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        if t.data_type == TensorProto.BFLOAT16:
            dt = numpy_dtype("bfloat16")
        return np.frombuffer(self.raw(t), dtype=dt).reshape(tuple(t.dims))


def load_graphs(bundle: Bundle) -> dict[str, onnx.ModelProto]:
    """The portable graphs (prefill, decode, score): what calibration measures and quantizes. The ONNX
    Runtime graph is not carried into a calibrated bundle, which runs its portable Q/DQ graphs."""
    return {kind: onnx.load(str(bundle.graph_path(kind)), load_external_data=False)
            for kind, graph in bundle.manifest["graphs"].items() if graph.get("flavor") != "ort"}


def check_source(bundle: Bundle) -> None:
    """Refuse a bundle that is already quantized."""
    q = bundle.manifest.get("quantization")
    if q:
        raise BundleError(f"{bundle.path}: bundle is already quantized ({q.get('scheme', 'unknown scheme')}); "
                          f"calibrate the FP bundle it was made from")


class SourceModel:
    """The graphs of an FP bundle and their linear layers (the LM head counts as quantized only
    when `quantize_head` is set)."""

    def __init__(self, bundle: Bundle, quantize_head: bool = False):
        self.bundle, self.quantize_head = bundle, quantize_head
        self.graphs = load_graphs(bundle)
        self.linears = find_linears(self.graphs)
        if not any(l.layer is not None for l in self.linears.values()):
            raise BundleError(f"{bundle.path}: no linear layers found in the graphs")
        self.float_dtype = activation_dtype(next(iter(self.graphs.values())), self.linears)
        if self.float_dtype not in NP_OF_ONNX:
            raise UserError(f"{bundle.path}: {bundle.manifest.get('dtype')} bundles are not supported by "
                            f"calibrate (fp32 or fp16; TensorRT has no bf16 Q/DQ scales on RTX GPUs before SM89)")
        self.float_np = NP_OF_ONNX[self.float_dtype]     # activations' numpy type; scales are stored in it
        self.inits = {k: initializer_map(m) for k, m in self.graphs.items()}
        self.weights = SourceWeights(bundle)
        self.layers = sorted({l.layer for l in self.linears.values() if l.layer is not None})

    def weight(self, name: str) -> np.ndarray:
        """A stored tensor by initializer name (from whichever graph holds it)."""
        for inits in self.inits.values():
            if name in inits:
                return self.weights.array(inits[name])
        raise KeyError(name)

    def quantized_linears(self) -> list[Linear]:
        return [l for l in self.linears.values() if l.layer is not None or self.quantize_head]

    def groups(self) -> dict[str, list[Linear]]:
        """Activation group -> the quantized linears reading it."""
        out: dict[str, list[Linear]] = {}
        for l in self.quantized_linears():
            out.setdefault(l.group, []).append(l)
        return out

    def layer_linears(self, layer: int | None) -> list[Linear]:
        """The quantized linears of one decoder layer (None: the head)."""
        return [l for l in self.quantized_linears() if l.layer == layer]
