"""Calibration and evaluation text: documents from a file, tokenized into one stream, cut into windows.

A text file holds one document per blank-line-separated block; a `.jsonl` file holds one JSON
object per line with a `text` field. Documents are tokenized with the bundle's tokenizer (no
special tokens added) and joined into one token stream with the end-of-sequence token between
them, so every window is real text of exactly `seq_len` tokens.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_documents(path: str | Path) -> list[str]:
    """Documents of a text or JSONL file; raises ValueError with a one-line message on bad input."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a text or JSONL file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() in JSONL_SUFFIXES:
        docs = []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{no}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{no}: expected a JSON object with a string field 'text'")
            if obj["text"].strip():
                docs.append(obj["text"])
    else:
        docs = [d.strip() for d in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text) if d.strip()]
    if not docs:
        raise ValueError(f"{path}: no text in it (empty calibration/evaluation file)")
    return docs


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tokenize_documents(tokenizer, docs: list[str], separator: int | None) -> np.ndarray:
    """One int64 token stream: each document's tokens, then `separator` (if any)."""
    if tokenizer is None:
        raise ValueError("the bundle has no tokenizer, so text cannot be tokenized")
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
        raise ValueError(f"--seq-len must be at least 2 (got {seq_len})")
    if samples < 1:
        raise ValueError(f"--samples must be at least 1 (got {samples})")
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"{source}: {len(stream)} tokens is shorter than one window of --seq-len {seq_len}")
    all_windows = stream[: n * seq_len].reshape(n, seq_len)
    take = min(samples, n)
    chosen = np.unique(np.linspace(0, n - 1, take).round().astype(int))
    rest = np.setdiff1d(np.arange(n), chosen)
    return Windows(all_windows[chosen], all_windows[rest], len(stream), documents)


# -- a corpus that is on every machine --------------------------------------------------------
def python_docstrings(modules: list[str] | None = None, min_chars: int = 200) -> dict[str, list[str]]:
    """Docstrings (module, class, function) of Python standard-library modules, read from their
    source files with `ast` (nothing is imported). Real English prose that every machine has; use
    disjoint module lists for calibration and evaluation. Returns module name -> docstrings."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py")) if modules is None else [stdlib / f"{m}.py" for m in modules]
    out: dict[str, list[str]] = {}
    for f in files:
        if not f.exists():
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= min_chars:
                    docs.append(d)
        if docs:
            out[f.stem] = docs
    return out


def write_corpus(path: str | Path, docs: list[str]) -> Path:
    """Write documents as a blank-line-separated text file (inner blank lines become single breaks)."""
    path = Path(path)
    cleaned = [re.sub(r"\n[ \t]*\n+", "\n", d.strip()) for d in docs]
    path.write_text("\n\n".join(cleaned) + "\n", encoding="utf-8")
    return path
