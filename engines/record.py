"""engines.json, the writing side: the precisions a build may ask for, and the file itself.

What the record holds is assembled by engines/builder.py; reading it back and the rules that refuse
a wrong engine are the runtime's (runtime/engine_record.py), since engines.json is part of the bundle.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..runtime.engine_record import RECORD

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def float_precision(rec: dict) -> str:
    """The float type of an engine's non-INT8 layers (an int8 engine's is its graph's dtype)."""
    return rec.get("graph_dtype") or rec["precision"]


def write(folder: Path, rec: dict) -> None:
    (folder / RECORD).write_text(json.dumps(rec, indent=2), encoding="utf-8")
