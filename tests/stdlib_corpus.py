"""A corpus that is on every machine: docstrings of Python standard-library modules, written as
calibration/evaluation text files (blank-line-separated documents). The SmolLM2 calibration
tests use it; docs/CALIBRATION.md's table was made from it:

    python tests/stdlib_corpus.py OUT.txt MODULE [MODULE ...]
"""
from __future__ import annotations

import ast
import re
import sys
import sysconfig
from pathlib import Path


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


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    found = python_docstrings(sys.argv[2:])
    write_corpus(sys.argv[1], [d for m in sys.argv[2:] for d in found.get(m, [])])
