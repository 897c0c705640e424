"""Write 8-bit RGB PNG files with zlib alone (Pillow is not a runtime dependency)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from .atomic import FULL_OR_READ_ONLY, describe_write_error
from .errors import UserError


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(rgb: np.ndarray) -> bytes:
    """rgb: uint8 [H, W, 3] -> the bytes of a PNG file (no filtering, zlib level 6)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] array, got {rgb.dtype} {list(rgb.shape)}")
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), np.ascontiguousarray(rgb).reshape(h, w * 3)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)       # 8-bit truecolour, no interlace
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
            + _chunk(b"IEND", b""))


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write atomically: a failed write never leaves a truncated file under the final name."""
    path = Path(path)
    data = png_bytes(rgb)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException as e:                     # a full disk, Ctrl-C, SIGTERM: no partial file stays
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in FULL_OR_READ_ONLY:
            raise UserError(describe_write_error(path, e)) from None
        if isinstance(e, OSError):             # named by the file asked for, not by its temporary name
            raise UserError(f"{path}: cannot write there: {e.strerror or e}") from None
        raise
    return path
