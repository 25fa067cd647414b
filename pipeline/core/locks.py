"""One job per output: an exclusive OS lock on a small file, held for the whole job.

A POSIX record lock (lockf), not flock and not a pid file: the kernel frees it when the process exits in
any way (kill -9 included), and processes forked by the job (DataLoader workers, shard workers) do not
inherit it, so a killed job frees its output at once even while orphaned workers linger. Stale lock files
after a kill are harmless: the next job simply takes the lock. On a clean exit the lock file is removed
(a refused job leaves nothing behind); a job that locked a file another one is removing sees the
inode change and retries, so two jobs never both hold the same path.
"""
from __future__ import annotations

import errno
import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.core.errors import BusyError

_HELD: set[str] = set()  # POSIX locks never conflict within one process: track this process's own
_HELD_GUARD = threading.Lock()


@contextmanager
def exclusive_lock(lock_file: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on `lock_file` (created if needed) for the block; BusyError if another process
    (or this one) holds it. `what` names the thing being protected in the error, e.g. "run directory runs/a"."""
    path = Path(lock_file).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path)
    with _HELD_GUARD:
        if key in _HELD:
            raise BusyError(f"{what} is in use by another job in this process (lock {path})")
        _HELD.add(key)
    try:
        fd = _acquire(path, what)
        try:
            yield path
        finally:
            try:
                path.unlink(missing_ok=True)  # while still holding it: see the module docstring
            finally:
                os.close(fd)
    finally:
        with _HELD_GUARD:
            _HELD.discard(key)


def _acquire(path: Path, what: str) -> int:
    """Open, lock and return the descriptor of the file now at `path` (retrying if it was replaced)."""
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise BusyError(f"{what} is in use by another kdpipe job (lock {path}); wait for it to finish "
                                f"or stop it") from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it as we opened it: lock the new file instead
    raise BusyError(f"{what}: could not take the lock {path} (it keeps being replaced)")
