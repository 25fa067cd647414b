"""Low-level pieces of the shard writer: preparing one image, a byte-reproducible tar writer,
DALI index files, atomic writes and a bounded ordered process map.

Kept apart from `shards.py` (the plan, resume and manifest logic) so each file stays readable.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from PIL import Image, UnidentifiedImageError

PASS_THROUGH_MODES = ("RGB", "L")  # JPEG colour modes every decoder (DALI, PIL, torchvision) reads as-is
TAR_BLOCK = 512

T = TypeVar("T")
R = TypeVar("R")


# ----------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Prepared:
    """One input file after preparation: JPEG bytes and size, or the reason it was rejected."""

    data: bytes | None
    height: int = 0
    width: int = 0
    reencoded: str = ""  # why it was re-encoded ("" = bytes passed through)
    reason: str = ""  # rejection reason ("" = accepted)


def jpeg_is_complete(data: bytes) -> bool:
    """Cheap truncation check: starts with SOI and ends with EOI (ignoring trailing NUL padding)."""
    return data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


def _one_line(msg: object) -> str:
    """An error message as one deterministic line (no tabs, newlines or object addresses)."""
    return " ".join(re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<file>", str(msg)).split())


def encode_rgb_jpeg(im: Image.Image, quality: int, max_side: int | None) -> tuple[bytes, int, int]:
    """Decode-side normalisation: any mode -> RGB, optional downscale so max(h, w) <= max_side, baseline JPEG."""
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


def prepare_image(path: str | Path, quality: int = 95, max_side: int | None = None) -> Prepared:
    """Read one file and return shard-ready JPEG bytes, or a rejection with its reason.

    RGB/greyscale baseline JPEGs pass through byte for byte after a cheap check (PIL header parse
    plus SOI/EOI markers); a JPEG failing the marker check gets a full decode (accepted if it
    decodes: trailing bytes after EOI are harmless). Everything else is fully decoded and
    re-encoded as RGB JPEG at `quality`.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Prepared(None, reason=f"unreadable: {_one_line(e.strerror or e)}")
    if not data:
        return Prepared(None, reason="zero-byte file")
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
        if jpeg_is_complete(data):
            return Prepared(data, height, width)
        try:
            im.load()
        except Exception as e:
            return Prepared(None, reason=f"truncated or corrupt JPEG: {_one_line(e)}")
        return Prepared(data, height, width)
    why = "downscaled" if too_big else f"{fmt} {mode}{' progressive' if progressive else ''} -> RGB JPEG"
    try:
        im.load()
        out, h, w = encode_rgb_jpeg(im, quality, max_side)
    except Exception as e:
        return Prepared(None, reason=f"truncated or corrupt {fmt}: {_one_line(e)}")
    return Prepared(out, h, w, reencoded=why)


def prepare_many(paths: Sequence[str], quality: int, max_side: int | None) -> list[Prepared]:
    """A chunk of work for one pool task (fewer, larger messages than one task per image)."""
    return [prepare_image(p, quality, max_side) for p in paths]


def jpg_digest(data: bytes) -> str:
    """Per-sample checksum stored in each sample's .json, so verify can name a sample whose bytes changed."""
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------- process pool


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: a worker exits when its parent dies (a kill -9 would otherwise orphan it forever,
    blocked on the task queue). Linux prctl(PR_SET_PDEATHSIG); elsewhere a no-op."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def ordered_map(fn: Callable[[list[T]], list[R]], items: Iterable[T], workers: int, chunk: int = 16,
                window: int = 4) -> Iterator[R]:
    """fn over chunks of items in `workers` processes, results in input order.

    At most workers*window chunks are in flight, so memory stays bounded however fast the
    workers are (Pool.imap queues every task up front and buffers every result).
    """
    if workers <= 1:
        for c in _chunks(items, chunk):
            yield from fn(c)
        return
    import multiprocessing as mp

    # fork (like torch's DataLoader on Linux): no re-import of __main__, works from scripts and stdin;
    # the children run only PIL and file reads.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ex = ProcessPoolExecutor(workers, mp_context=ctx, initializer=die_with_parent, initargs=(os.getpid(),))
    try:
        todo = _chunks(items, chunk)
        pending = deque(ex.submit(fn, c) for c in islice(todo, workers * window))
        while pending:
            done = pending.popleft().result()
            for c in islice(todo, 1):
                pending.append(ex.submit(fn, c))
            yield from done
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------- tar files


class _HashingFile:
    """File wrapper that hashes and counts what tarfile writes (no second read for the sha256)."""

    def __init__(self, f: io.BufferedWriter):
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.pos += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.pos


class TarShardWriter:
    """Writes one tar to `path` via a temp name; members carry fixed metadata so bytes are reproducible.

    add() returns each member's data offset; close() fsyncs and renames, so no partial tar ever
    exists under the final name.
    """

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        self._f = open(self.tmp, "wb")
        self._h = _HashingFile(self._f)
        self._tar = tarfile.TarFile(fileobj=self._h, mode="w", format=tarfile.USTAR_FORMAT)
        self.members: list[tuple[str, int, int]] = []  # (name, data offset, size), for the DALI index

    def add(self, name: str, data: bytes) -> int:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        offset = self._tar.offset - (len(data) + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
        self.members.append((name, offset, len(data)))
        return offset

    def close(self) -> tuple[int, str]:
        """Finish the tar; returns (bytes, sha256)."""
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self._h.pos, self._h.sha.hexdigest()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def dali_index_text(members: Sequence[tuple[str, int, int]]) -> str:
    """The index file DALI's wds2idx writes (format v1.2): a header, then one line per sample of
    `ext offset size name` groups, offsets pointing at member data."""
    samples: list[list[str]] = []
    last = None
    for name, offset, size in members:
        dot = name.find(".", name.rfind("/") + 1)
        key, ext = name[:dot], name[dot + 1:]
        if key != last:
            samples.append([])
            last = key
        samples[-1].append(f"{ext} {offset} {size} {name}")
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


# --------------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via temp file + fsync + rename, so readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())
