"""Preparing one input image for a shard: pass through, re-encode, or reject with a reason.

Runs in the writer's worker processes. The common case (an 8-bit baseline RGB/greyscale JPEG
that ends with its EOI marker) is recognised by a small marker parser, about 10x cheaper than
PIL's header parse; its bytes are not shipped back to the writer, which reads the file itself
(page-cache hot after this read), so the workers and the writer never copy images through a pipe.
"""
from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

PASS_THROUGH_MODES = ("RGB", "L")  # JPEG colour modes every decoder (DALI, PIL, torchvision) reads as-is
BASELINE_SOF = (0xC0, 0xC1)  # baseline / extended sequential Huffman; others (progressive, lossless...) re-encode
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class Prepared:
    """One input file after preparation.

    Accepted (reason == ""): data holds re-encoded bytes, or None when the file passes through
    byte for byte (the writer reads it; size and crc say what it must find). Rejected: reason says why.
    """

    data: bytes | None
    height: int = 0
    width: int = 0
    size: int = 0
    crc32: int = 0
    reencoded: str = ""  # why it was re-encoded ("" = bytes pass through)
    reason: str = ""  # rejection reason ("" = accepted)


def jpeg_is_complete(data: bytes) -> bool:
    """Cheap truncation check: starts with SOI and ends with EOI (ignoring trailing NUL padding)."""
    return data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def jpeg_frame(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(SOF marker, precision, height, width, components) from a JPEG's frame header, or None.

    Walks the marker segments from SOI to the first SOF; None for anything unexpected (the caller
    then falls back to PIL).
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or scan data before any frame header
            return None
        if marker in SOF_MARKERS:
            if i + 10 > n:
                return None
            return (marker, data[i + 4], int.from_bytes(data[i + 5:i + 7], "big"),
                    int.from_bytes(data[i + 7:i + 9], "big"), data[i + 9])
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _one_line(msg: object) -> str:
    """An error message as one deterministic line (no tabs, newlines or object addresses)."""
    return " ".join(re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<file>", str(msg)).split())


def encode_rgb_jpeg(im: Image.Image, quality: int, max_side: int | None) -> tuple[bytes, int, int]:
    """Any mode -> RGB, optional downscale so max(h, w) <= max_side, baseline JPEG at `quality`."""
    if im.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    if max_side is not None and max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC,
                       reducing_gap=3.0)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), im.height, im.width


def _with_pil(data: bytes, quality: int, max_side: int | None) -> Prepared:
    """The general path: PIL identifies the file; odd JPEGs and other formats are decoded and re-encoded."""
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode, (width, height) = im.format, im.mode, im.size
        progressive = bool(im.info.get("progressive") or im.info.get("progression"))
    except UnidentifiedImageError:
        return Prepared(None, reason="not an image: format not recognised")
    except Exception as e:  # PIL raises many types for broken headers; the reason is recorded, not swallowed
        return Prepared(None, reason=f"not an image: {_one_line(e)}")
    too_big = max_side is not None and max(width, height) > max_side
    if fmt == "JPEG" and mode in PASS_THROUGH_MODES and not progressive and not too_big:
        try:  # no EOI at the end: accept only if it fully decodes (trailing bytes after EOI are harmless)
            im.load()
        except Exception as e:
            return Prepared(None, reason=f"truncated or corrupt JPEG: {_one_line(e)}")
        return Prepared(None, height, width, len(data), zlib.crc32(data))
    why = "downscaled" if too_big else f"{fmt} {mode}{' progressive' if progressive else ''} -> RGB JPEG"
    try:
        im.load()
        out, h, w = encode_rgb_jpeg(im, quality, max_side)
    except Exception as e:
        return Prepared(None, reason=f"truncated or corrupt {fmt}: {_one_line(e)}")
    return Prepared(out, h, w, len(out), zlib.crc32(out), reencoded=why)


def prepare_image(path: str | Path, quality: int = 95, max_side: int | None = None) -> Prepared:
    """Decide how one file goes into a shard.

    8-bit baseline RGB/greyscale JPEGs that end with EOI pass through byte for byte after a cheap
    check (marker parse + SOI/EOI; a full decode costs ~20x more, see tools/bench_shard.py).
    CMYK, progressive, PNG and other formats are decoded and re-encoded as RGB JPEG at `quality`;
    so is anything larger than max_side. Unreadable, empty, truncated and non-image files are rejected.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Prepared(None, reason=f"unreadable: {_one_line(e.strerror or e)}")
    if not data:
        return Prepared(None, reason="zero-byte file")
    frame = jpeg_frame(data)
    if frame is not None and jpeg_is_complete(data):
        sof, precision, height, width, comps = frame
        fits = max_side is None or max(height, width) <= max_side
        if sof in BASELINE_SOF and precision == 8 and comps in (1, 3) and height > 0 and width > 0 and fits:
            return Prepared(None, height, width, len(data), zlib.crc32(data))
    return _with_pil(data, quality, max_side)


def prepare_many(paths: Sequence[str], quality: int, max_side: int | None) -> list[Prepared]:
    """A chunk of work for one pool task (fewer, larger messages than one task per image)."""
    return [prepare_image(p, quality, max_side) for p in paths]
