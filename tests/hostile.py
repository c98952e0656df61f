"""Hostile image files for tests: hand-made PNGs (bombs, extreme shapes) and a seeded corpus of damaged files."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 0, rows: bytes | None = None,
              row_bytes: int | None = None) -> bytes:
    """A PNG file with the given header; the image data is ``rows`` (filter bytes included) or, by default, ``height``
    all-zero rows of ``row_bytes`` bytes each (compressed as it is generated, so huge images stay cheap)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    compressor = zlib.compressobj(9)
    if rows is None:
        zero_row = bytes(1 + (row_bytes if row_bytes is not None else width))
        data = b"".join(compressor.compress(zero_row) for _ in range(height)) + compressor.flush()
    else:
        data = compressor.compress(rows) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit grey ``side`` x ``side`` PNG of zeros: about 48 KB on disk for 20000 x 20000 (400 million pixels)."""
    return png_bytes(side, side, bit_depth=1, row_bytes=(side + 7) // 8)


def line_png(width: int, height: int) -> bytes:
    """An 8-bit grey PNG of a single row or column with a ramp, e.g. 1 x 100000 (a few hundred bytes)."""
    values = (np.arange(width * height) % 256).astype(np.uint8).reshape(height, width)
    rows = b"".join(b"\x00" + row.tobytes() for row in values)
    return png_bytes(width, height, rows=rows)


FORMATS = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "webp": "WEBP", "tif": "TIFF", "bmp": "BMP"}


def _encoded(image: Image.Image, suffix: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, FORMATS[suffix])
    return buffer.getvalue()


def damaged_corpus(folder: Path, seed: int = 0, per_format: int = 4) -> list[Path]:
    """Writes, per supported format, one intact file, ``per_format`` mutated ones (bytes flipped, a range zeroed or
    the file cut short) and one with a flipped header; plus random bytes, an empty file, a bomb, a 1 x 100000 PNG and
    a 100000 x 1 one. Returns the paths, sorted. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    for suffix in FORMATS:
        pixels = rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3), dtype=np.uint8)
        intact = _encoded(Image.fromarray(pixels), suffix)
        files[f"intact.{suffix}"] = intact
        for number in range(per_format):
            data = bytearray(intact)
            kind = number % 3
            if kind == 0:
                for position in rng.integers(0, len(data), 8):
                    data[position] ^= int(rng.integers(1, 256))
            elif kind == 1:
                start = int(rng.integers(len(data) // 4, len(data)))
                data[start : start + 64] = bytes(len(data[start : start + 64]))
            else:
                data = data[: int(rng.integers(8, len(data)))]
            files[f"mutated_{number}.{suffix}"] = bytes(data)
        header = bytearray(intact)
        header[int(rng.integers(0, 16))] ^= 0xFF
        files[f"header.{suffix}"] = bytes(header)
    files["random.jpg"] = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    files["empty.png"] = b""
    files["bomb.png"] = bomb_png()
    files["column_1x100000.png"] = line_png(1, 100000)
    files["row_100000x1.png"] = line_png(100000, 1)
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return sorted(paths)
