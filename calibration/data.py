"""Calibration and evaluation text: documents from a file, tokenized into one stream, cut into windows.

A text file holds one document per blank-line-separated block; a `.jsonl` file holds one JSON
object per line with a `text` field. Documents are tokenized with the bundle's tokenizer (no
special tokens added) and joined into one token stream with the end-of-sequence token between
them, so every window is real text of exactly `seq_len` tokens.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.files import sha256_file
from ..runtime.errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_documents(path: str | Path) -> list[str]:
    """Documents of a text or JSONL file; raises ValueError with a one-line message on bad input."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a text or JSONL file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() in JSONL_SUFFIXES:
        docs = []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{no}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f"{path}:{no}: expected a JSON object with a string field 'text'")
            if obj["text"].strip():
                docs.append(obj["text"])
    else:
        docs = [d.strip() for d in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text) if d.strip()]
    if not docs:
        raise UserError(f"{path}: no text in it (empty calibration/evaluation file)")
    return docs


def tokenize_documents(tokenizer, docs: list[str], separator: int | None) -> np.ndarray:
    """One int64 token stream: each document's tokens, then `separator` (if any)."""
    if tokenizer is None:
        raise UserError("the bundle has no tokenizer, so text cannot be tokenized")
    parts = []
    for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
        parts.append(enc.ids)
        if separator is not None:
            parts.append([separator])
    return np.fromiter((t for p in parts for t in p), dtype=np.int64)


@dataclass
class Windows:
    """Calibration windows [n, seq_len] and the held-out windows left over (for a quick check)."""
    calib: np.ndarray
    heldout: np.ndarray
    total_tokens: int
    documents: int


def load_stream(bundle, path: str | Path) -> tuple[np.ndarray, int]:
    """(token stream, number of documents) of a file, tokenized with the bundle's tokenizer."""
    docs = read_documents(path)
    eos = bundle.eos_ids
    return tokenize_documents(bundle.tokenizer(), docs, eos[0] if eos else None), len(docs)


def make_windows(stream: np.ndarray, seq_len: int, samples: int, source: str = "data",
                 documents: int = 0) -> Windows:
    """Cut the stream into non-overlapping windows; take `samples` of them spread over the whole
    file for calibration and keep the others as held-out windows."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (got {seq_len})")
    if samples < 1:
        raise UserError(f"--samples must be at least 1 (got {samples})")
    n = len(stream) // seq_len
    if n == 0:
        raise UserError(f"{source}: {len(stream)} tokens is shorter than one window of --seq-len {seq_len}")
    all_windows = stream[: n * seq_len].reshape(n, seq_len)
    take = min(samples, n)
    chosen = np.unique(np.linspace(0, n - 1, take).round().astype(int))
    rest = np.setdiff1d(np.arange(n), chosen)
    return Windows(all_windows[chosen], all_windows[rest], len(stream), documents)


# -- what calibration runs on ---------------------------------------------------------------------
@dataclass
class CalibrationData:
    """The windows calibration runs, the held-out windows of its perplexity check, and what
    calibration.json records about the data."""
    windows: np.ndarray
    check: np.ndarray
    record: dict
    available: int          # windows of seq_len tokens the data holds in all


def token_stream(bundle, data) -> tuple[np.ndarray, int]:
    """(token stream, number of documents) of a text/JSONL file, or of an int array of token ids
    (the Python API's way to calibrate a bundle without a tokenizer)."""
    if not isinstance(data, np.ndarray):
        return load_stream(bundle, data)
    stream = np.asarray(data, np.int64).reshape(-1)
    if len(stream) and not (0 <= stream.min() and stream.max() < bundle.vocab_size):
        raise UserError(f"token ids must be in [0, {bundle.vocab_size})")
    return stream, 1


def check_windows(bundle, heldout: np.ndarray, seq_len: int, count: int, check_data: str | None) -> np.ndarray:
    """Up to `count` windows spread over the held-out ones (or over the windows of `check_data`)."""
    if check_data:
        stream, _ = load_stream(bundle, check_data)
        n = len(stream) // seq_len
        if n == 0:
            raise UserError(f"{check_data}: shorter than one window of --seq-len {seq_len}")
        heldout = stream[: n * seq_len].reshape(n, seq_len)
    if not count or not len(heldout):
        return np.zeros((0, seq_len), np.int64)
    idx = np.unique(np.linspace(0, len(heldout) - 1, min(count, len(heldout))).round().astype(int))
    return heldout[idx]


def calibration_data(bundle, data, seq_len: int, samples: int, check_count: int = 4,
                     check_data: str | None = None) -> CalibrationData:
    """`samples` windows of `data` (a file or token ids) and `check_count` held-out windows."""
    stream, documents = token_stream(bundle, data)
    is_file = not isinstance(data, np.ndarray)
    w = make_windows(stream, seq_len, samples, source=str(data) if is_file else "token ids", documents=documents)
    check = check_windows(bundle, w.heldout, seq_len, check_count, check_data)
    record = {"file": str(Path(data).resolve()) if is_file else None,
              "sha256": sha256_file(data) if is_file else None, "documents": documents,
              "tokens": int(w.total_tokens), "seq_len": seq_len, "samples_requested": samples,
              "samples": int(len(w.calib)), "check_windows": int(len(check)),
              "check_source": check_data or "held-out windows of the calibration file"}
    return CalibrationData(w.calib, check, record, len(w.calib) + len(w.heldout))
