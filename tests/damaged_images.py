"""A small fuzz corpus of damaged images: valid PNG, JPEG, WebP and GIF files made with PIL, then
truncated, with bytes flipped in their headers and chunks, and with wrong length fields."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}


def valid_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((24, 40, 3)) * 255).astype("uint8"))
    out = {}
    for fmt in FORMATS:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out[fmt] = buf.getvalue()
    return out


def length_fields(fmt: str, data: bytes) -> list[tuple[int, int, str]]:
    """(offset, size in bytes, byte order) of the fields that give a length or a size."""
    fields = []
    if fmt == "PNG":  # every chunk starts with its 4-byte big-endian length
        pos = 8
        while pos + 8 <= len(data):
            fields.append((pos, 4, "big"))
            pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    elif fmt == "JPEG":  # segments: FF xx, then a 2-byte big-endian length (up to the scan)
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            fields.append((pos + 2, 2, "big"))
            if data[pos + 1] == 0xDA:
                break
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    elif fmt == "WEBP":  # the RIFF size and the first chunk's size, little-endian
        fields += [(4, 4, "little"), (16, 4, "little")]
    else:  # GIF: logical screen width and height, then the image descriptor's width and height
        fields += [(6, 2, "little"), (8, 2, "little")]
        desc = data.find(b"\x2c", 13)
        if desc > 0:
            fields += [(desc + 5, 2, "little"), (desc + 7, 2, "little")]
    return fields


def mutations(fmt: str, data: bytes) -> dict[str, bytes]:
    n, out = len(data), {}
    for cut in (1, 3, 8, 16, 24, 33, n // 4, n // 2, n - 20, n - 1):
        out[f"cut{cut}"] = data[:cut]
    rng = np.random.default_rng(len(data))
    for pos in [*range(0, 48, 3), *rng.integers(48, n, 6).tolist()]:
        b = bytearray(data)
        b[pos] ^= 0xFF
        out[f"flip{pos}"] = bytes(b)
    for pos, size, order in length_fields(fmt, data):
        value = int.from_bytes(data[pos:pos + size], order)
        for name, wrong in (("plus1", value + 1), ("minus1", max(value - 1, 0)), ("max", (1 << 8 * size) - 1)):
            b = bytearray(data)
            b[pos:pos + size] = (wrong % (1 << 8 * size)).to_bytes(size, order)
            out[f"len{pos}{name}"] = bytes(b)
    return out


def write_corpus(folder: Path) -> list[Path]:
    """Every damaged file, written under ``folder`` (about 170 files of a few hundred bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt, data in valid_files().items():
        for name, damaged in mutations(fmt, data).items():
            path = folder / f"{fmt.lower()}-{name}.{FORMATS[fmt]}"
            path.write_bytes(damaged)
            paths.append(path)
    return paths
