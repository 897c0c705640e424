"""Perplexity with a sliding window over the score graph (logits of every position in one pass),
and ONNX Runtime sessions over bundles or over graphs held in memory.

Sliding window: windows of `seq_len` tokens start every `stride` tokens; each token is scored
once, in the first window where it has a predecessor and has not been scored yet, so with
stride < seq_len every scored token after the first window sees at least seq_len - stride tokens
of context. stride == seq_len: disjoint windows (fastest).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ..runtime.sessions import ask_exact_int8, open_session, session_options, wants_exact_int8
from ..runtime.errors import UserError

IN_MEMORY = "__in_memory__"      # external-data location of tensors handed to ONNX Runtime from memory
# Largest graph we serialize whole (to a file or to ONNX Runtime): protobuf refuses messages over 2 GiB,
# and every weight lives in a weights file or in memory, so a graph proto holds only small constants.
MAX_PROTO_BYTES = 1 << 30
PACKED_TYPES = (TensorProto.INT4, TensorProto.UINT4)     # no numpy type: handed over as in-memory files


def serialized(model: onnx.ModelProto, name: str) -> bytes:
    """The model's bytes; refuses (one line) a graph that carries its weights inside (over MAX_PROTO_BYTES)."""
    size = model.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise RuntimeError(f"{name}: the graph proto is {size / 2**20:.0f} MiB (limit {MAX_PROTO_BYTES / 2**20:.0f} "
                           f"MiB): weights must be external data, not inside the graph")
    return model.SerializeToString()


def save_graph(model: onnx.ModelProto, path: str | Path) -> None:
    """Write a graph whose weights are external data (checked: see serialized())."""
    Path(path).write_bytes(serialized(model, str(path)))


def in_memory_initializer(name: str, array: np.ndarray) -> TensorProto:
    """A data-less TensorProto for `array`; the array itself is given to the session (see session())."""
    t = TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape),
                    data_location=TensorProto.EXTERNAL)
    for k, v in (("location", IN_MEMORY), ("offset", "0"), ("length", str(array.nbytes))):
        t.external_data.add(key=k, value=v)
    return t


def session(model: onnx.ModelProto | str | Path, base_dir: str | Path | None = None,
            arrays: dict[str, np.ndarray] | None = None, threads: int | None = None, device: str = "cpu"):
    """An InferenceSession (on the CPU unless `device` says "cuda") of a graph file, or of a ModelProto
    whose external data lives in `base_dir` (the bundle it came from) except the tensors given in
    `arrays` (by name)."""
    options = session_options(threads, warnings=False)
    if isinstance(model, (str, Path)):
        return open_session(model, options, device)
    if base_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(Path(base_dir).resolve()))
    name = f"{model.graph.name or 'graph'} (in memory)"
    keep = []
    if arrays:
        model, keep = _add_in_memory_initializers(model, options, arrays, base_dir)
    if wants_exact_int8(model):
        ask_exact_int8(options)             # what the runtime asks for this graph (runtime/sessions.py)
    sess = open_session(serialized(model, name), options, name=name)
    sess._ardeploy_keep = keep            # the session reads these buffers: keep them alive
    return sess


def _add_in_memory_initializers(model: onnx.ModelProto, options, arrays: dict[str, np.ndarray],
                                base_dir: str | Path | None) -> tuple[onnx.ModelProto, list]:
    """Hand the arrays of the model's in-memory initializers to ONNX Runtime; returns the model to load
    and what must outlive the session's creation. Plain arrays go as OrtValues over their memory. INT4
    tensors (packed, two per byte) have no numpy type, so then every external tensor goes as an in-memory
    file: each array its own, the bundle's weights files as memory maps (ONNX Runtime takes external
    files either all from memory or all from disk)."""
    import onnxruntime as ort
    mine = [t for t in model.graph.initializer
            if any(e.key == "location" and e.value == IN_MEMORY for e in t.external_data)]
    missing = sorted({t.name for t in mine} - set(arrays))
    if missing:
        raise RuntimeError(f"no array given for in-memory initializer(s) {missing[:3]}")
    if not any(t.data_type in PACKED_TYPES for t in mine):
        names = sorted({t.name for t in mine})
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arrays[n])) for n in names]
        options.add_external_initializers(names, values)
        return model, values
    if not files_in_memory(options):
        return _embedded_packed(model, arrays, options, base_dir)
    model = _copy_graph_only(model)
    files: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        if info["location"] == IN_MEMORY:
            files[f"{IN_MEMORY}/{t.name}"] = np.ascontiguousarray(arrays[t.name]).view(np.uint8).reshape(-1)
            _set_location(t, f"{IN_MEMORY}/{t.name}")
        elif info["location"] not in files:
            files[info["location"]] = np.memmap(Path(base_dir or ".") / info["location"], np.uint8, mode="r")
    names = sorted(files)
    options.add_external_initializers_from_files_in_memory(names, [files[n] for n in names],
                                                           [files[n].nbytes for n in names])
    return model, [files]


def files_in_memory(options) -> bool:
    """Whether ONNX Runtime takes external files from memory (its Python API since 1.23)."""
    return hasattr(options, "add_external_initializers_from_files_in_memory")


def _copy_graph_only(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _set_location(t: TensorProto, location: str) -> None:
    for e in t.external_data:
        if e.key == "location":
            e.value = location


def _embedded_packed(model, arrays, options, base_dir):
    """Older ONNX Runtime: INT4 tensors go into the graph itself (serialized() refuses one too large)."""
    model = _copy_graph_only(model)
    for t in model.graph.initializer:
        if t.data_type in PACKED_TYPES and any(e.key == "location" and e.value == IN_MEMORY for e in t.external_data):
            t.raw_data = np.asarray(arrays[t.name], np.uint8).tobytes()
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    return _add_in_memory_initializers(model, options, arrays, base_dir)


def score_fn(sess):
    def run(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(1, -1)
        return sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
    return run


def scoring_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (got {seq_len})")
    if not 1 <= stride <= seq_len:
        raise UserError(f"--stride must be between 1 and --seq-len {seq_len} (got {stride})")
    if n_tokens < 2:
        raise UserError(f"the text has {n_tokens} token(s); perplexity needs at least 2")
    windows, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        prev_end = end
        if end >= n_tokens:
            return windows
        begin += stride


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) for each row of logits [n, V] (float64 result)."""
    logits = np.asarray(logits, np.float32)
    m = logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=-1, dtype=np.float64)) + m[:, 0]
    return lse - logits[np.arange(len(targets)), targets]


def perplexity(run, stream: np.ndarray, seq_len: int = 512, stride: int | None = None,
               progress: bool = True, desc: str = "eval") -> dict:
    from tqdm import tqdm
    stride = seq_len if stride is None else stride
    windows = scoring_windows(len(stream), seq_len, stride)
    total, count, t0 = 0.0, 0, time.perf_counter()
    for begin, end, first in tqdm(windows, desc=desc, unit="window", disable=not progress, leave=False):
        logits = run(stream[begin:end])
        rows = logits[first - 1 - begin: end - 1 - begin]
        nll = token_nll(rows, stream[first:end])
        total += float(nll.sum())
        count += len(nll)
    secs = time.perf_counter() - t0
    mean = total / count
    return {"ppl": math.exp(mean), "nll": mean, "tokens": int(len(stream)), "scored_tokens": count,
            "windows": len(windows), "seq_len": seq_len, "stride": stride, "seconds": round(secs, 2),
            "tokens_per_s": round(sum(e - b for b, e, _ in windows) / secs, 1) if secs > 0 else None}


def bundle_perplexity(bundle, stream: np.ndarray, seq_len: int, stride: int | None = None,
                      threads: int | None = None, progress: bool = True, device: str = "cpu") -> dict:
    if not bundle.has_graph("score"):
        raise UserError(f"{bundle.path}: bundle has no score graph (re-export without --no-score)")
    sess = session(bundle.graph_path("score"), threads=threads, device=device)
    try:
        return perplexity(score_fn(sess), stream, seq_len, stride, progress, desc=f"eval {Path(bundle.path).name}")
    except Exception as e:              # noqa: BLE001 - ONNX Runtime's own exception types are not importable
        if device != "cpu" and "Unsupported quantization type" in str(e):
            # e.g. ONNX Runtime 1.31's CUDA DequantizeLinear has no blocked INT8 (a w4a16 bundle's 8-bit head)
            raise UserError(f"{bundle.path}: ONNX Runtime's {device} provider cannot run this bundle's score graph "
                            f"({str(e).split('Status Message: ')[-1].strip()}); evaluate it with --device cpu") from None
        raise
