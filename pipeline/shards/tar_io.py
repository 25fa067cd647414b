"""Low-level pieces of the shard writer: a byte-reproducible tar writer, DALI index files and the hashing
process (image preparation is in `image.py`, the process map in `pipeline/core/procs.py`).

Kept apart from `writer.py` (the plan, resume and manifest logic) so each file stays readable.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import signal
import threading
import traceback
from pathlib import Path
from typing import Callable, Sequence

from pipeline.core.atomic import name_the_file
from pipeline.core.digest import file_sha256
from pipeline.core.procs import WorkerError, die_with_parent

TAR_BLOCK = 512


# ------------------------------------------------------------------------------------- tar files


# The constant parts of a ustar header for a regular file with mode 0444, uid/gid 0, mtime 0 and empty
# owner names (fixed metadata: shards are byte-reproducible). Layout: name[100] mode[8] uid[8] gid[8]
# size[12] mtime[12] chksum[8] typeflag[1] linkname[100] magic+version[8] uname[32] gname[32] dev[16] prefix[155]
# pad[12].
_MODE_IDS = b"0000444\x000000000\x000000000\x00"
_MTIME = b"00000000000\x00"
_AFTER_CHKSUM = b"0" + bytes(100) + b"ustar\x0000" + bytes(TAR_BLOCK - 265)
_CONST_SUM = sum(_MODE_IDS) + sum(_MTIME) + 8 * 0x20 + sum(_AFTER_CHKSUM)  # chksum field counts as 8 spaces


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header tarfile writes for `name` with the fixed metadata above (tested
    byte for byte against tarfile). Built from constants because it runs 4 times per sample in the
    writer's one thread: ~2 us instead of tarfile's ~70 us."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name too long for ustar: {name!r}")
    size_field = b"%011o\x00" % size
    chksum = _CONST_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, bytes(100 - len(raw)), _MODE_IDS, size_field, _MTIME, b"%06o\x00 " % chksum,
                     _AFTER_CHKSUM))


_ZEROS = bytes(TAR_BLOCK)
RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to a multiple of this


def _hash_loop(conn, parent_pid: int) -> None:
    """The hashing process: ("feed", path, upto) hashes a growing file up to `upto` (no reply);
    ("digest", path) hashes the rest and replies with the hex sha256 (or a WorkerError)."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    open_files: dict[str, tuple[int, object, list[int]]] = {}  # path -> (fd, sha, [bytes hashed])
    while (task := conn.recv()) is not None:
        kind, path = task[0], task[1]
        try:
            if path not in open_files:
                open_files[path] = (os.open(path, os.O_RDONLY), hashlib.sha256(), [0])
            fd, sha, done = open_files[path]
            upto = task[2] if kind == "feed" else os.fstat(fd).st_size
            if upto > done[0]:  # hashed straight from the page cache through a mapping (no copy)
                start = done[0] - done[0] % mmap.ALLOCATIONGRANULARITY
                with mmap.mmap(fd, upto - start, offset=start, access=mmap.ACCESS_READ) as mm:
                    with memoryview(mm) as view:
                        sha.update(view[done[0] - start:])
                done[0] = upto
            result = None
            if kind == "forget":
                os.close(open_files.pop(path)[0])
            elif kind == "digest":
                os.close(open_files.pop(path)[0])
                result = sha.hexdigest()
        except Exception:  # handed to the parent, which raises it
            entry = open_files.pop(path, None)
            if entry is not None:
                os.close(entry[0])
            result = WorkerError(traceback.format_exc())
        if kind == "digest":
            conn.send(result)


class HashProcess:
    """A child process that hashes shards from the page cache while they are written.

    Why a process: hashing in a thread of the writer made the writing thread wait for the GIL at
    every hand-off (~2 ms each on a busy machine). The writer `feed`s it every few MB written (one
    small message, no reply), so by the time a shard is finished only its tail is left to hash and
    the digest no longer sits on the critical path after the last write. Thread-safe (the writer's
    finisher thread asks for digests while the main thread feeds the next shard).
    """

    def __init__(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_hash_loop, args=(child, os.getpid()), daemon=True)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()

    def feed(self, path: Path, upto: int) -> None:
        """Hash `path` up to byte `upto` (all written already) in the background."""
        with self._lock:
            self._conn.send(("feed", str(path), upto))

    def forget(self, path: Path) -> None:
        """Drop what was hashed of `path` (its writer gave up on it)."""
        with self._lock:
            self._conn.send(("forget", str(path)))

    def __call__(self, path: Path) -> str:
        with self._lock:
            self._conn.send(("digest", str(path)))
            try:
                result = self._conn.recv()
            except EOFError:
                raise WorkerError(f"hashing process {self._proc.pid} died") from None
        if isinstance(result, WorkerError):
            raise result
        return result

    def close(self) -> None:
        if self._proc.is_alive():
            self._conn.send(None)
            self._proc.join()
        self._conn.close()


HASH_FEED = 8 << 20  # bytes written between hasher feeds and early-writeback starts
_SYNC_FILE_RANGE_WRITE = 2
_LIBC: list = []


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a range of dirty pages to disk now (Linux sync_file_range, non-blocking), so the
    fsync that makes a shard durable waits only for the last few MB. A no-op where unavailable."""
    if not _LIBC:
        import ctypes

        try:
            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _LIBC.append(fn)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class TarShardWriter:
    """Writes one tar to `path` via a temp name, one writev per sample, byte-identical to what
    tarfile writes for the same members with fixed metadata.

    add_sample() returns each member's data offset; close() fsyncs and renames, so no partial tar
    ever exists under the final name, and returns the size and sha256 (`hasher`: in this thread by
    default, or a HashProcess, which is fed as the file grows). Every HASH_FEED bytes the writer
    also starts the disk writeback of what it wrote, so the closing fsync waits for little.
    """

    def __init__(self, path: Path, hasher: Callable[[Path], str] = file_sha256):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._hasher = hasher
        self._feed = getattr(hasher, "feed", None)
        self.pos = self._fed = 0
        self.members: list[tuple[str, int, int]] = []  # (name, data offset, size), for the DALI index

    def add_sample(self, members: Sequence[tuple[str, bytes]]) -> list[int]:
        """Append the members of one sample; returns their data offsets."""
        parts, offsets, pos = [], [], self.pos
        for name, data in members:
            pad = -len(data) % TAR_BLOCK
            parts += [ustar_header(name, len(data)), data, _ZEROS[:pad]]
            offsets.append(pos + TAR_BLOCK)
            self.members.append((name, pos + TAR_BLOCK, len(data)))
            pos += TAR_BLOCK + len(data) + pad
        self._writev(parts)
        self.pos = pos
        if pos - self._fed >= HASH_FEED:
            start_writeback(self._fd, self._fed, pos - self._fed)
            if self._feed is not None:
                self._feed(self.tmp, pos)
            self._fed = pos
        return offsets

    def _writev(self, parts: list[bytes]) -> None:
        if not parts:
            return
        total = sum(map(len, parts))
        try:
            written = os.writev(self._fd, parts)
            if written != total:  # short write (rare): finish the rest plainly
                rest = b"".join(parts)[written:]
                while rest:
                    rest = rest[os.write(self._fd, rest):]
        except OSError as e:  # a full disk: the one-line error names the shard
            raise name_the_file(e, self.path)

    def close(self) -> tuple[int, str]:
        """Finish the tar (two zero blocks, padded to a 10 KiB record), fsync, hash, rename; returns (bytes, sha256)."""
        end = 2 * TAR_BLOCK
        end += -(self.pos + end) % RECORD
        self._writev([bytes(end)])
        self.pos += end
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise name_the_file(e, self.path)
        os.close(self._fd)
        self._fd = -1
        sha = self._hasher(self.tmp)
        os.replace(self.tmp, self.path)
        return self.pos, sha

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if self._fed and hasattr(self._hasher, "forget"):
                self._hasher.forget(self.tmp)
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

