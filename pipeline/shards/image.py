"""Preparing one input image for a shard: pass through, re-encode, or reject with a reason.

Runs in the writer's worker processes. The common case (an 8-bit baseline RGB/greyscale JPEG
that ends with its EOI marker) is recognised by a small marker parser, about 10x cheaper than
PIL's header parse; its bytes are not shipped back to the writer, which reads the file itself
(page-cache hot after this read), so the workers and the writer never copy images through a pipe.
"""
from __future__ import annotations

import io
import math
import os
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PASS_THROUGH_MODES = ("RGB", "L")  # JPEG colour modes every decoder (DALI, PIL, torchvision) reads as-is
BASELINE_SOF = (0xC0, 0xC1)  # baseline / extended sequential Huffman; others (progressive, lossless...) re-encode
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# PIL's decompression-bomb bound (what `verify`'s decoder accepts without a warning); larger images are refused,
# or downscaled with --max-side
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
ORIENTATION_TAG = 0x0112  # EXIF Orientation: DALI applies it, torchvision and nvImageCodec (as used here) do not
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
Frame = tuple[int, int, int, int, int, int]  # SOF marker, precision, height, width, components, EXIF orientation


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
    source: tuple[int, int] = (-1, -1)  # the input file's (size, mtime_ns) when read: a resume compares them


def source_stamp(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a source file, (-1, -1) when it cannot be stat'ed: what tells a resumed `shard`
    that a file changed since an earlier run put it into a finished shard."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def changed_source(stamps: Sequence[Sequence[int]] | None, root_dir: str, rels: Sequence[str]) -> str | None:
    """The first of a finished shard's source files (`rels`, below `root_dir`) whose size or mtime differ from
    the `stamps` recorded when it was written, else None (also for a shard written before stamps were)."""
    if stamps is None:
        return None
    if len(stamps) != len(rels):
        return rels[0] if rels else ""
    for rel, stamp in zip(rels, stamps):
        if source_stamp(root_dir + rel) != tuple(stamp):
            return rel
    return None


def jpeg_is_complete(data: bytes) -> bool:
    """Cheap truncation check: starts with SOI and ends with EOI (ignoring trailing NUL padding)."""
    return data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def exif_orientation(payload: bytes) -> int:
    """The Orientation tag of an APP1 payload that starts with b"Exif\\0\\0": 1 when it has none, 0 when the
    EXIF block cannot be read (the caller then lets PIL decide)."""
    tiff = payload[6:]
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 0
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 0
    for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
        if len(entry) < 12:
            return 0
        if int.from_bytes(entry[:2], order) == ORIENTATION_TAG:
            return int.from_bytes(entry[8:10], order) if int.from_bytes(entry[2:4], order) == 3 else 0
    return 1


def jpeg_frame(data: bytes) -> Frame | None:
    """(SOF marker, precision, height, width, components, EXIF orientation) from a JPEG's headers, or None.

    Walks the marker segments from SOI to the first SOF (reading the first EXIF block on the way); None for
    anything unexpected (the caller then falls back to PIL).
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n, orientation, exif_seen = 2, len(data), 1, False
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
                    int.from_bytes(data[i + 7:i + 9], "big"), data[i + 9], orientation)
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xE1 and not exif_seen and data[i + 4:i + 10] == b"Exif\0\0":  # the first one counts (PIL)
            orientation, exif_seen = exif_orientation(data[i + 4:i + 2 + length]), True
        i += 2 + length
    return None


def jpeg_problem(frame: Frame | None) -> str:
    """Why a JPEG cannot be stored byte for byte ("" when it can): the one acceptance rule of `shard` (which
    re-encodes such files) and `verify` (which names stored ones). A stored JPEG must read the same in every
    backend: torchvision and nvImageCodec (libjpeg-turbo, no EXIF rotation), DALI (nvJPEG on GPUs, which
    applies the EXIF orientation and has no progressive/12-bit/arithmetic fast path) and PIL (verify)."""
    if frame is None:
        return "JPEG headers the marker parser cannot read"
    sof, precision, height, width, comps, orientation = frame
    if sof not in BASELINE_SOF:
        return "progressive JPEG" if sof in (0xC2, 0xC6, 0xCA, 0xCE) else f"JPEG with SOF{sof - 0xC0:X} coding"
    if precision != 8:
        return f"{precision}-bit JPEG"
    if comps not in (1, 3):
        return f"JPEG with {comps} colour components (CMYK/YCCK)"
    if height == 0 or width == 0:
        return "JPEG with a zero side"
    if orientation != 1:
        return f"JPEG with EXIF orientation {orientation}" if orientation else "JPEG with an unreadable EXIF block"
    if height * width > MAX_PIXELS:
        return too_many_pixels(height, width)
    return ""


def too_many_pixels(height: int, width: int) -> str:
    return f"{height}x{width} pixels, over the limit of {MAX_PIXELS} (PIL's decompression-bomb bound)"


def _one_line(msg: object) -> str:
    """An error message as one deterministic line (no tabs, newlines or object addresses)."""
    return " ".join(re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<file>", str(msg)).split())


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG, TIFF) scaled to 8 bits; PIL's own conversion clips it (nearly all white)."""
    a = np.asarray(im).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")


def encode_rgb_jpeg(im: Image.Image, quality: int, max_side: int | None) -> tuple[bytes, int, int]:
    """Any mode -> RGB, optional downscale so max(h, w) <= max_side, baseline JPEG at `quality` (no EXIF block:
    the caller has applied the orientation to the pixels)."""
    if im.mode in SIXTEEN_BIT_MODES:
        im = to_8bit(im)
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


def _open_header(data: bytes) -> Image.Image:
    """PIL's lazy open (the header only) without its decompression-bomb check, which refuses images over twice
    its bound with an error that reads "not an image" and warns on stderr above it: `_with_pil` applies
    MAX_PIXELS itself, naming the size, and lets --max-side downscale such an image."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # a worker process prepares one image at a time
    try:
        return Image.open(io.BytesIO(data))
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _with_pil(data: bytes, quality: int, max_side: int | None) -> Prepared:
    """The general path: PIL identifies the file; odd JPEGs and other formats are decoded and re-encoded."""
    try:
        im = _open_header(data)
        fmt, mode, (width, height) = im.format, im.mode, im.size
    except UnidentifiedImageError:
        return Prepared(None, reason="not an image: format not recognised")
    except Exception as e:  # PIL raises many types for broken headers; the reason is recorded, not swallowed
        return Prepared(None, reason=f"not an image: {_one_line(e)}")
    too_big = max_side is not None and max(width, height) > max_side
    if width * height > MAX_PIXELS and not too_big:
        return Prepared(None, reason=f"{too_many_pixels(height, width)}; --max-side downscales such images")
    if width * height > MAX_PIXELS:  # and --max-side shrinks it: never hold the whole image in memory
        if fmt != "JPEG" and width * height > 2 * MAX_PIXELS:
            return Prepared(None, reason=f"{too_many_pixels(height, width)}; --max-side downscales only JPEGs "
                                         f"over {2 * MAX_PIXELS} pixels (decoded at a reduced scale)")
        if fmt == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale, still at least max_side on the long side
            scale = max_side / max(width, height)
            im.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    problem = jpeg_problem(jpeg_frame(data)) if fmt == "JPEG" else f"{fmt}"
    if fmt == "JPEG" and mode in PASS_THROUGH_MODES and not problem and not too_big:
        try:  # no EOI at the end: accept only if it fully decodes (trailing bytes after EOI are harmless)
            im.load()
        except Exception as e:
            return Prepared(None, reason=f"truncated or corrupt JPEG: {_one_line(e)}")
        return Prepared(None, height, width, len(data), zlib.crc32(data))
    why = "downscaled" if too_big else f"{problem or fmt} {mode} -> RGB JPEG"
    try:
        im.load()
        out, h, w = encode_rgb_jpeg(ImageOps.exif_transpose(im), quality, max_side)  # pixels as a viewer shows them
    except Exception as e:
        return Prepared(None, reason=f"truncated or corrupt {fmt}: {_one_line(e)}")
    if h * w > MAX_PIXELS:  # --max-side larger than the limit allows
        return Prepared(None, reason=f"{too_many_pixels(h, w)}; a smaller --max-side downscales it further")
    return Prepared(out, h, w, len(out), zlib.crc32(out), reencoded=why)


def prepare_image(path: str | Path, quality: int = 95, max_side: int | None = None) -> Prepared:
    """Decide how one file goes into a shard.

    8-bit baseline RGB/greyscale JPEGs without an EXIF rotation that end with EOI pass through byte for byte
    after a cheap check (marker parse + SOI/EOI; a full decode costs ~20x more, see tools/bench_shard.py).
    Whatever `jpeg_problem` names (CMYK, progressive, 12-bit, EXIF orientation other than 1), PNG and other
    formats are decoded, turned upright by their EXIF orientation, and re-encoded as RGB JPEG at `quality`;
    so is anything larger than max_side. Unreadable, empty, truncated and non-image files, and images over
    MAX_PIXELS (unless --max-side downscales them), are rejected.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as e:
        return Prepared(None, reason=f"unreadable: {_one_line(e.strerror or e)}", source=source_stamp(str(path)))
    return replace(_prepare_bytes(data, quality, max_side), source=(st.st_size, st.st_mtime_ns))


def _prepare_bytes(data: bytes, quality: int, max_side: int | None) -> Prepared:
    if not data:
        return Prepared(None, reason="zero-byte file")
    frame = jpeg_frame(data)
    if frame is not None and jpeg_is_complete(data) and not jpeg_problem(frame):
        height, width = frame[2], frame[3]
        if max_side is None or max(height, width) <= max_side:
            return Prepared(None, height, width, len(data), zlib.crc32(data))
    return _with_pil(data, quality, max_side)


def prepare_many(paths: Sequence[str], quality: int, max_side: int | None) -> list[Prepared]:
    """A chunk of work for one pool task (fewer, larger messages than one task per image)."""
    return [prepare_image(p, quality, max_side) for p in paths]
