"""Atomic file writes: temp file in the same directory, fsync, rename, fsync of the directory.

A crash leaves either the old file or the whole new one, never half of one. The temp name is
`.<name>.tmp`, which the shard writer recognises as its own leftover. Every JSON file kdpipe writes goes
through `atomic_write_json` (one format: sorted keys, ASCII, a final newline); files another library writes
(ONNX, PNG) are written to a temp name by it and put in place by `atomic_replace`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_replace(tmp: str | Path, path: str | Path) -> None:
    """Put a finished temp file (in path's directory) in place: fsync it, rename it over path, fsync the
    directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def atomic_write_bytes(path: str | Path, data: bytes, *, keep_same: bool = False) -> None:
    """Write data to path via `.<name>.tmp` + fsync + rename (+ fsync of the directory). keep_same: leave a
    file that already holds exactly `data` untouched (a rerun over a finished output changes nothing)."""
    path = Path(path)
    if keep_same and path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise name_the_file(e, path)
    _fsync_dir(path.parent)


def name_the_file(e: BaseException, path: str | Path) -> BaseException:
    """`e`, naming `path` if it is an OSError that names no file (a full disk on write() or fsync()), so the
    CLI's one line says which output it was writing."""
    if isinstance(e, OSError) and e.filename is None:
        e.filename = str(path)
    return e


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(obj: object, indent: int = 1) -> str:
    """The JSON text of every file kdpipe writes: sorted keys, ASCII (json's ensure_ascii), a final newline."""
    return json.dumps(obj, indent=indent, sort_keys=True) + "\n"


def atomic_write_json(path: str | Path, obj: object, *, indent: int = 1, keep_same: bool = False) -> None:
    """The one JSON file writer: `json_text(obj, indent)` written atomically (keep_same: see atomic_write_bytes)."""
    atomic_write_bytes(path, json_text(obj, indent).encode(), keep_same=keep_same)
