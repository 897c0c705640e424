"""Write 8-bit RGB PNG files with zlib alone (Pillow is not a runtime dependency)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from .atomic import write_file_whole


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
    return write_file_whole(path, png_bytes(rgb))
