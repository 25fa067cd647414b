"""Integrity of a teacher cache: a crc32 per (unit, array), written with the unit and checked on every read.

Why a checksum of the decoded data, per array: a chunk file that is missing reads back as the fill value
(zeros: training on all-zero logits, silently), and a flipped byte either fails zstd or decodes to other
numbers; both fail the crc32 of the unit's rows. The `checksum` array (E, chunks, A) uint32 holds one crc32
per data array of the unit (in `CacheLayout.data_arrays` order), written before the unit's `done` marker.
Reading an epoch slice checks it (about 1 % of the slice's load time: docs/cache.md); `kdpipe verify
--cache` checks every unit; the writer treats damaged units as pending, so a rerun repairs them.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import one_line

CHECKSUM = "checksum"
READ_ERRORS = (RuntimeError, ValueError, OSError)  # what zarr raises for an unreadable chunk (zstd, size)


def crc32_rows(rows: np.ndarray) -> int:
    """crc32 of an array's bytes in C order, little-endian (the unit's rows of one array, as stored)."""
    a = np.ascontiguousarray(rows)
    return zlib.crc32(a.astype(a.dtype.newbyteorder("<"), copy=False).view(np.uint8))


@dataclass(frozen=True)
class Damage:
    """One damaged (unit, array): where, and why (checksum mismatch, unreadable or missing chunk file)."""

    epoch: int
    chunk: int
    array: str
    why: str

    def line(self) -> str:
        return f"epoch {self.epoch} chunk {self.chunk}: {self.array} {self.why}"


def read_rows(arr: Any, epoch: int, chunk_n: int, chunks: int) -> tuple[np.ndarray, dict[int, str]]:
    """arr[epoch] (chunks of chunk_n rows along axis 0 of the slice), and {chunk: why} for chunks that cannot
    be decoded (their rows are left at zero). One read when all is well; chunk by chunk only after a failure."""
    try:
        return np.asarray(arr[epoch]), {}
    except READ_ERRORS:
        pass
    out = np.zeros(arr.shape[1:], dtype=arr.dtype)
    bad = {}
    for c in range(chunks):
        try:
            out[c * chunk_n:(c + 1) * chunk_n] = arr[epoch, c * chunk_n:(c + 1) * chunk_n]
        except READ_ERRORS as e:
            bad[c] = f"chunk unreadable ({type(e).__name__}: {one_line(e, 120)})"
    return out, bad


def read_done(group: Any, shape: tuple[int, int]) -> np.ndarray:
    """The (E, chunks) bool progress; an unreadable marker counts as not done (the unit is recomputed)."""
    done = group["done"]
    try:
        return np.asarray(done[:], dtype=bool)
    except READ_ERRORS:
        out = np.zeros(shape, dtype=bool)
        for e in range(shape[0]):
            for c in range(shape[1]):
                try:
                    out[e, c] = bool(done[e, c])
                except READ_ERRORS:
                    pass
        return out


def check_epoch(group: Any, layout: Any, epoch: int, names: tuple[str, ...], done: np.ndarray
                ) -> tuple[dict[str, np.ndarray], list[Damage]]:
    """Read arrays `names` at `epoch` and check every done unit's rows against its recorded crc32.

    Returns the slices and the damage found (empty when all is well)."""
    chunks, cn = layout.chunks_per_epoch, layout.chunk_n
    recorded, bad_record = read_rows(group[CHECKSUM], epoch, 1, chunks)
    data, damage = {}, []
    for name in names:
        col = layout.data_arrays.index(name)
        data[name], unreadable = read_rows(group[name], epoch, cn, chunks)
        for c in np.flatnonzero(done).tolist():
            why = unreadable.get(c) or bad_record.get(c)
            if why is None and crc32_rows(data[name][c * cn:(c + 1) * cn]) != int(recorded[c, col]):
                why = "fails its checksum" + _missing_file(group, name, (epoch, c) + (0,) * (data[name].ndim - 1))
            if why is not None:
                ids = f"ids {c * cn}..{min((c + 1) * cn, layout.num_samples) - 1}"
                damage.append(Damage(epoch, c, name, f"{why} ({ids})"))
    return data, damage


def _missing_file(group: Any, name: str, coords: tuple[int, ...]) -> str:
    """' (chunk file NAME/c/... missing)' when a local store lacks the chunk file, else ''."""
    root = getattr(group.store, "root", None)
    if root is None:
        return ""
    key = group[name].metadata.encode_chunk_key(coords)
    return "" if (Path(root) / name / key).exists() else f": chunk file {name}/{key} is missing"


@dataclass
class CacheVerifyReport:
    """What `kdpipe verify --cache` found: damaged units, units never written, and what was checked."""

    path: str
    units: int = 0
    checked: int = 0
    damage: list[Damage] = field(default_factory=list)
    missing: dict[int, int] = field(default_factory=dict)  # epoch -> chunks never written

    @property
    def ok(self) -> bool:
        return not self.damage and not self.missing

    def problems(self) -> list[str]:
        out = [d.line() for d in self.damage]
        out += [f"epoch {e}: {n} of the epoch's chunks never written (incomplete)" for e, n in self.missing.items()]
        return out
