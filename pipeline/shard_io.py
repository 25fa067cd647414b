"""Low-level pieces of the shard writer: a byte-reproducible tar writer, DALI index files, atomic
writes and a bounded ordered process map (image preparation is in `shard_image.py`).

Kept apart from `shards.py` (the plan, resume and manifest logic) so each file stays readable.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

TAR_BLOCK = 512

T = TypeVar("T")
R = TypeVar("R")


# ---------------------------------------------------------------------------------- process pool


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile writes for a regular file with mode 0444, uid/gid 0, empty
    owner names and mtime 0 (fixed metadata: shards are byte-reproducible). Built directly because
    tarfile's general path costs ~70 us a member, the writer's biggest cost."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name too long for ustar: {name!r}")
    h = bytearray(TAR_BLOCK)
    h[0:len(raw)] = raw
    h[100:148] = b"0000444\x000000000\x000000000\x00" + b"%011o\x00" % size + b"00000000000\x00"
    h[148:156] = b"        "
    h[156] = 0x30  # REGTYPE "0"
    h[257:265] = b"ustar\x0000"
    h[148:155] = b"%06o\x00" % sum(h)
    return bytes(h)


_ZEROS = bytes(TAR_BLOCK)
RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to a multiple of this


HASH_BLOCK = 1 << 20


def file_sha256(path: Path, block: int = HASH_BLOCK) -> str:
    """sha256 of a file in 1 MiB reads (verify; and the reference the writer's tail hash is tested against)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


class _TailHasher(threading.Thread):
    """Hashes a file while it is being written, following the writer in 1 MiB preads (page-cache hot).

    Why not hash each sample as it is written: a dozen small updates per sample kept the writing
    thread waiting for the GIL; big blocks let hashlib drop the GIL for long stretches. And why not
    hash after closing: that put a whole shard's hash (~0.15 s / 100 MB) on the critical path.
    """

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self._fd = os.open(path, os.O_RDONLY)
        self._sha = hashlib.sha256()
        self._done = 0
        self._target = 0
        self._final = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self.start()

    def advance(self, pos: int, final: bool = False) -> None:
        """The writer has written `pos` bytes (all of them when final)."""
        with self._cond:
            self._target, self._final = pos, final
            self._cond.notify()

    def run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._target - self._done < HASH_BLOCK and not self._final:
                        self._cond.wait()
                    target, final = self._target, self._final
                while self._done < target:
                    data = os.pread(self._fd, min(HASH_BLOCK, target - self._done), self._done)
                    if not data:
                        raise OSError(f"short read at {self._done} while hashing")
                    self._sha.update(data)
                    self._done += len(data)
                if final:
                    return
        except BaseException as e:  # handed to the writer by result()
            self._error = e
        finally:
            os.close(self._fd)

    def result(self) -> str:
        self.join()
        if self._error is not None:
            raise self._error
        return self._sha.hexdigest()


class TarShardWriter:
    """Writes one tar to `path` via a temp name, one writev per sample, byte-identical to what
    tarfile writes for the same members with fixed metadata.

    add_sample() returns each member's data offset; close() fsyncs and renames, so no partial tar
    ever exists under the final name, and returns the size and sha256 (hashed as the file grows).
    """

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._hasher = _TailHasher(self.tmp)
        self._told = 0
        self.pos = 0
        self.members: list[tuple[str, int, int]] = []  # (name, data offset, size), for the DALI index

    def add_sample(self, members: Sequence[tuple[str, bytes]]) -> list[int]:
        """Append the members of one sample; returns their data offsets."""
        parts, offsets = [], []
        for name, data in members:
            pad = -len(data) % TAR_BLOCK
            parts += [ustar_header(name, len(data)), data, _ZEROS[:pad]]
            offsets.append(self.pos + TAR_BLOCK)
            self.members.append((name, self.pos + TAR_BLOCK, len(data)))
            self.pos += TAR_BLOCK + len(data) + pad
        self._writev(parts)
        if self.pos - self._told >= HASH_BLOCK:
            self._hasher.advance(self.pos)
            self._told = self.pos
        return offsets

    def add(self, name: str, data: bytes) -> int:
        return self.add_sample([(name, data)])[0]

    def _writev(self, parts: list[bytes]) -> None:
        total = sum(len(p) for p in parts)
        written = os.writev(self._fd, parts)
        if written != total:  # short write (rare): finish the rest plainly
            rest = b"".join(parts)[written:]
            while rest:
                rest = rest[os.write(self._fd, rest):]

    def close(self) -> tuple[int, str]:
        """Finish the tar (two zero blocks, padded to a 10 KiB record), fsync, rename; returns (bytes, sha256)."""
        end = 2 * TAR_BLOCK
        end += -(self.pos + end) % RECORD
        self._writev([bytes(end)])
        self.pos += end
        self._hasher.advance(self.pos, final=True)
        os.fsync(self._fd)
        sha = self._hasher.result()
        os.close(self._fd)
        self._fd = -1
        os.replace(self.tmp, self.path)
        return self.pos, sha

    def abort(self) -> None:
        if self._fd >= 0:
            self._hasher.advance(self.pos, final=True)
            self._hasher.join()
            os.close(self._fd)
            self._fd = -1
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
