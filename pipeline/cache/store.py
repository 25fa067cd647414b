"""The teacher cache: a Zarr v3 store of teacher logits and confidence weights per (aug epoch, sample id).

Arrays (standard codecs, bytes + zstd; full layout in docs/cache.md): `logits` (E, N, C) float16, or
`topk_values` float16 log-probabilities + `topk_indices` int16 (E, N, K); `weight` and `entropy` (E, N)
float32 at tau=1; `checksum` (E, chunks, A) uint32; `done` (E, chunks) uint8 progress. Attributes: layout
and `fingerprint`.

A unit of work is (epoch e, chunk c) = ids [c*chunk_n, (c+1)*chunk_n): it covers exactly one chunk of every
array, so parallel writers that own disjoint units never touch one chunk file. Its `done` marker is written
after its data and checksums, and zarr's local store writes each chunk file atomically (temp file + rename),
so after a kill -9 a unit is either marked and complete, or unmarked and recomputed by the next run. Damage
after that (a lost chunk file, a flipped byte) fails the unit's checksums (pipeline/cache/checks.py): reads
refuse it (CacheDamageError naming epoch and chunk) and the writer recomputes it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.fingerprint import (FORMAT, LAYOUT_VERSION, _jsonable, cache_fingerprint, fingerprint_diff,
                                view_fingerprint)
from pipeline.cache.checks import CHECKSUM, CacheVerifyReport, Damage, check_epoch, crc32_rows, read_done
from pipeline.core.entropy import confidence_weight, entropy, log_softmax
from pipeline.core.errors import (CacheDamageError, CacheError, CacheMismatchError, ConfigError, IncompleteCacheError,
                     MissingDataError, OutputExistsError, TeacherLogitsError)

__all__ = ["CacheDamageError", "CacheMismatchError", "IncompleteCacheError", "TeacherCache", "TeacherCacheWriter",
           "CacheLayout", "cache_fingerprint", "view_fingerprint", "fingerprint_diff"]

DEFAULT_CHUNK_N = 4096  # samples per chunk and per unit of work: ~0.8 MB of float16 logits at C=100


# ---------------------------------------------------------------- numerics (pure)

def entropy_and_weight(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entropy H (nats) of softmax(logits) per row and the confidence weight 1 - H / log C, at tau=1
    (pipeline.core.entropy). Computed in float64 from the full-precision logits so the cached weight does not
    carry float16 error."""
    ent = entropy(logits)
    return ent.astype(np.float32), confidence_weight(ent, np.shape(logits)[1]).astype(np.float32)


def topk_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest log-probabilities (descending, float16) and their class indices (int16).

    Log-probabilities rather than logits: softmax(logp / tau) == softmax(z / tau) for every tau, and the
    probability mass left for the other classes is known without the dropped logits."""
    logp = log_softmax(logits)
    idx = np.argpartition(-logp, k - 1, axis=1)[:, :k]  # the k largest, unordered: O(C), not O(C log C)
    idx = np.take_along_axis(idx, np.argsort(-np.take_along_axis(logp, idx, 1), axis=1, kind="stable"), 1)
    return np.take_along_axis(logp, idx, axis=1).astype(np.float16), idx.astype(np.int16)


def expand_topk(values: np.ndarray, indices: np.ndarray, num_classes: int) -> np.ndarray:
    """Full (n, C) float32 log-probabilities from top-k: the kept classes get their stored log-probability,
    the remaining mass 1 - sum(exp(kept)) is spread uniformly over the other C - k classes."""
    v = np.asarray(values, dtype=np.float64)
    rest = np.clip(1.0 - np.exp(v).sum(axis=1), 1e-12, None)  # float16 rounding can push the sum past 1
    out = np.repeat((np.log(rest) - math.log(num_classes - v.shape[1]))[:, None], num_classes, axis=1)
    np.put_along_axis(out, np.asarray(indices, dtype=np.int64), v, axis=1)
    return out.astype(np.float32)


# ---------------------------------------------------------------- layout

@dataclass(frozen=True)
class CacheLayout:
    """Shapes of a store. topk=0 stores full logits; chunk_n is the id-range per chunk and per unit of work."""

    epochs: int
    num_samples: int
    num_classes: int
    chunk_n: int = DEFAULT_CHUNK_N
    topk: int = 0

    def __post_init__(self) -> None:
        if min(self.epochs, self.num_samples, self.num_classes, self.chunk_n) < 1:
            raise ValueError(f"cache layout needs positive sizes, got {self}")
        if not 0 <= self.topk < self.num_classes:
            raise ValueError(f"topk must be in [0, num_classes={self.num_classes}), got {self.topk}")
        if self.num_classes > np.iinfo(np.int16).max and self.topk:
            raise ValueError(f"topk indices are int16: at most {np.iinfo(np.int16).max} classes")

    @property
    def chunks_per_epoch(self) -> int:
        return -(-self.num_samples // self.chunk_n)

    def id_range(self, chunk: int) -> tuple[int, int]:
        """[start, stop) sample ids of chunk `chunk`."""
        return chunk * self.chunk_n, min((chunk + 1) * self.chunk_n, self.num_samples)

    def units(self, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
        """(epoch, chunk) units this rank owns: units r, r+W, ... of the epoch-major list (disjoint chunks)."""
        every = [(e, c) for e in range(self.epochs) for c in range(self.chunks_per_epoch)]
        return every[rank::world_size]

    @property
    def data_arrays(self) -> tuple[str, ...]:
        """The arrays a unit writes, in the order of the `checksum` array's last axis."""
        return ("topk_values", "topk_indices", "weight", "entropy") if self.topk else ("logits", "weight", "entropy")

    def attrs(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _open_group(path: str | Path, mode: str):
    """The store's root group; a missing or unreadable one is a one-line error naming the path."""
    import zarr

    from pipeline.core.remote import is_url

    if is_url(str(path)) and mode != "r":
        raise ConfigError(f"{path}: a teacher cache is written to a local path; a URL can only be read")
    try:  # a URL is read through zarr's fsspec store (file://, s3:// with s3fs, http(s):// with aiohttp, ...)
        return zarr.open_group(str(path), mode=mode)
    except ImportError as e:  # the URL scheme's fsspec package is missing: say which
        raise ConfigError(f"{path}: {e}") from None
    except FileNotFoundError:
        raise MissingDataError(f"no teacher cache at {path} (run `kdpipe cache-teacher` to make one)") from None
    except (ValueError, OSError) as e:  # a damaged zarr.json
        raise CacheError(f"{path}: not a readable Zarr store ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
                         f"; make a new one with `kdpipe cache-teacher --out NEW`") from None


def read_layout(group, path: str | Path = "") -> CacheLayout:
    """The layout from the attributes; refuses other formats, other layout versions and missing arrays."""
    a, where = group.attrs, path or group.store
    if a.get("format") != FORMAT:
        raise CacheError(f"{where} is not a kdpipe teacher cache (format={a.get('format')!r})")
    if a.get("layout_version") != LAYOUT_VERSION:
        old = (" (written before per-unit checksums: its units cannot be verified)"
               if a.get("layout_version") == 1 else "")
        raise CacheError(f"{where}: teacher cache layout_version {a.get('layout_version')}{old} is not the supported "
                         f"{LAYOUT_VERSION}; make a new cache with `kdpipe cache-teacher --out NEW` (same options)")
    try:
        layout = CacheLayout(**{f.name: int(a[f.name]) for f in dataclasses.fields(CacheLayout)})
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"{where}: damaged layout attributes ({e}); make a new cache with "
                         f"`kdpipe cache-teacher`") from None
    have = set(group.array_keys())
    lost = [n for n in (*layout.data_arrays, CHECKSUM, "done") if n not in have]
    if lost:
        raise CacheError(f"{where}: arrays {', '.join(lost)} missing (their zarr.json is gone); the store cannot be "
                         f"repaired in place: make a new cache with `kdpipe cache-teacher --out NEW`")
    return layout


# ---------------------------------------------------------------- writer

class TeacherCacheWriter:
    """Writes units of a store. One writer per process; processes must own disjoint units."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.group = _open_group(path, "r+")
        self.layout = read_layout(self.group, path)
        self.fingerprint: dict[str, Any] = dict(self.group.attrs["fingerprint"])
        self._done = self.group["done"]
        self.damaged: list[Damage] = []  # found by the last pending_units(): recomputed as pending

    @classmethod
    def create(cls, path: str | Path, layout: CacheLayout, fingerprint: dict[str, Any]) -> "TeacherCacheWriter":
        """Create the store, or reopen an existing one made with the same layout and fingerprint (resume).

        An existing store for anything else is refused with the differing fields named, never overwritten."""
        import zarr

        if (Path(path) / "zarr.json").exists():
            writer = cls(path)
            fields, lines = fingerprint_diff(writer.fingerprint, fingerprint)
            lfields, llines = fingerprint_diff(writer.layout.attrs(), layout.attrs())
            if fields or lfields:
                raise CacheMismatchError(writer.path, fields + lfields, lines + llines)
            for stale in Path(path).rglob("*.partial"):  # zarr's temp files from a killed write
                stale.unlink(missing_ok=True)
            return writer
        if Path(path).exists() and not (Path(path).is_dir() and not any(Path(path).iterdir())):
            raise OutputExistsError(f"{path} exists and is not a teacher cache; choose another --out")
        attrs = {"format": FORMAT, "layout_version": LAYOUT_VERSION, **layout.attrs(),
                 "fingerprint": _jsonable(fingerprint)}
        # built beside the target and renamed into place: a crash never leaves a half-created store
        tmp = Path(path).with_name(f".{Path(path).name}.creating-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        group = zarr.open_group(str(tmp), mode="w-", attributes=attrs)
        e, n, c, k, cn = layout.epochs, layout.num_samples, layout.num_classes, layout.topk, layout.chunk_n
        zstd = zarr.codecs.ZstdCodec(level=3)

        def array(name: str, shape: tuple, dtype: str, dims: tuple, chunks: tuple, compress: bool = True):
            group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                               compressors=zstd if compress else None, dimension_names=dims)

        if k:
            array("topk_values", (e, n, k), "float16", ("epoch", "sample", "rank"), (1, cn, k))
            array("topk_indices", (e, n, k), "int16", ("epoch", "sample", "rank"), (1, cn, k))
        else:
            array("logits", (e, n, c), "float16", ("epoch", "sample", "class"), (1, cn, c))
        array("weight", (e, n), "float32", ("epoch", "sample"), (1, cn))
        array("entropy", (e, n), "float32", ("epoch", "sample"), (1, cn))
        a = len(layout.data_arrays)
        array(CHECKSUM, (e, layout.chunks_per_epoch, a), "uint32", ("epoch", "chunk", "array"), (1, 1, a),
              compress=False)
        array("done", (e, layout.chunks_per_epoch), "uint8", ("epoch", "chunk"), (1, 1), compress=False)
        os.rename(tmp, path)  # atomic (replaces an empty directory); fails if `path` gained files meanwhile
        return cls(path)

    def done_mask(self) -> np.ndarray:
        """(E, chunks_per_epoch) bool: which units are marked complete (an unreadable marker: not complete)."""
        return read_done(self.group, (self.layout.epochs, self.layout.chunks_per_epoch))

    def pending_units(self, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
        """This rank's share of the units not yet written or damaged: pending units r, r+W, ... (epoch-major).

        Every marked unit is checked against its checksums first (reads the whole store once: about as long
        as loading each epoch's slice), so a rerun of the same command repairs lost or damaged chunk files;
        they are listed in `.damaged` and in one warning. Dealing out the *pending* units keeps ranks
        balanced on a resume. All ranks must read the same progress: call it on every rank before any rank
        writes (the job puts a barrier after it)."""
        done = self.done_mask()
        self.damaged = [d for e in range(self.layout.epochs) if done[e].any()
                        for d in check_epoch(self.group, self.layout, e, self.layout.data_arrays, done[e])[1]]
        for d in self.damaged:
            done[d.epoch, d.chunk] = False
        if self.damaged and rank == 0:
            units = sorted({(d.epoch, d.chunk) for d in self.damaged})
            warnings.warn(f"teacher cache {self.path}: recomputing {len(units)} damaged units: "
                          + "; ".join(d.line() for d in self.damaged[:5])
                          + (f"; and {len(self.damaged) - 5} more" if len(self.damaged) > 5 else ""), stacklevel=2)
        return [(e, c) for e, c in self.layout.units() if not done[e, c]][rank::world_size]

    def write_unit(self, epoch: int, chunk: int, logits: np.ndarray) -> None:
        """Store the float32 teacher logits (n, C) of ids id_range(chunk) at `epoch`, then mark the unit done."""
        lo, hi = self.layout.id_range(chunk)
        z = np.asarray(logits, dtype=np.float32)
        if z.shape != (hi - lo, self.layout.num_classes):
            raise ValueError(f"unit (epoch {epoch}, chunk {chunk}) of {self.path} needs logits of shape "
                             f"{(hi - lo, self.layout.num_classes)}, got {z.shape}")
        if not np.isfinite(z).all():
            raise TeacherLogitsError(f"non-finite teacher logits for epoch {epoch}, ids [{lo}, {hi}) (unit: epoch "
                                     f"{epoch}, chunk {chunk}) of teacher cache {self.path}: the teacher diverged or "
                                     f"its weights are damaged; check --teacher-weights (this unit was not stored)")
        ent, w = entropy_and_weight(z)
        if self.layout.topk:
            values, indices = topk_logprobs(z, self.layout.topk)
            data = {"topk_values": values, "topk_indices": indices}
        else:
            if np.abs(z).max() > np.finfo(np.float16).max:
                raise TeacherLogitsError(f"teacher logits for epoch {epoch}, ids [{lo}, {hi}) (unit: epoch {epoch}, "
                                         f"chunk {chunk}) of teacher cache {self.path} exceed float16's range (max "
                                         f"|z| = {np.abs(z).max():.4g} > 65504): a diverged teacher? check "
                                         f"--teacher-weights, or use --topk (log-probabilities; this unit was not "
                                         f"stored)")
            data = {"logits": z.astype(np.float16)}
        data.update(weight=w, entropy=ent)
        for name, rows in data.items():
            self.group[name][epoch, lo:hi] = rows
        self.group[CHECKSUM][epoch, chunk] = [crc32_rows(data[n]) for n in self.layout.data_arrays]
        self._fsync([(n, (epoch, chunk) + (0,) * (data[n].ndim - 1)) for n in self.layout.data_arrays]
                    + [(CHECKSUM, (epoch, chunk, 0))])
        self._done[epoch, chunk] = 1  # last: the unit counts only once all its data and checksums are on disk
        self._fsync([("done", (epoch, chunk))])

    def _fsync(self, chunks: list[tuple[str, tuple[int, ...]]]) -> None:
        """Flush chunk files and their directories to the disk (local stores), so the order data -> marker
        also holds across a power loss, not only a killed process. A few ms per unit."""
        root = getattr(self.group.store, "root", None)
        if root is None:
            return
        for name, coords in chunks:
            path = Path(root) / name / self.group[name].metadata.encode_chunk_key(coords)
            for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
                try:
                    fd = os.open(target, flags)
                except FileNotFoundError:  # an all-zero chunk equal to the fill value is not stored
                    continue
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


# ---------------------------------------------------------------- reader

@dataclass
class _EpochSlice:
    weight: np.ndarray                 # (N,) float32
    logits: np.ndarray | None = None   # (N, C) float16
    values: np.ndarray | None = None   # (N, K) float16 log-probs
    indices: np.ndarray | None = None  # (N, K) int16


class TeacherCache:
    """Reads a store: one augmentation epoch at a time in RAM (a lookup is a numpy gather), the next one
    prefetched by a background thread. Picklable (worker processes reopen lazily)."""

    def __init__(self, path: str | Path, *, prefetch: bool = True):
        self.path = str(path)
        self.prefetch = prefetch
        self._group = _open_group(path, "r")
        self.layout = read_layout(self._group, path)
        self.epochs, self.num_samples, self.num_classes = (self.layout.epochs, self.layout.num_samples,
                                                           self.layout.num_classes)
        self.fingerprint: dict[str, Any] = dict(self._group.attrs["fingerprint"])
        self._lock = threading.Lock()
        self._current: tuple[int, _EpochSlice] | None = None
        self._next: tuple[int, Future] | None = None  # the prefetch of the following epoch
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "prefetch": self.prefetch}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], prefetch=state["prefetch"])

    def __repr__(self) -> str:
        lay = self.layout
        mode = f"top-{lay.topk}" if lay.topk else "full logits"
        return f"TeacherCache({self.path!r}, epochs={lay.epochs}, samples={lay.num_samples}, {mode})"

    # -- validation
    def check(self, expected: dict[str, Any]) -> None:
        """Raise CacheMismatchError naming every field of `expected` that differs from the stored fingerprint."""
        fields, lines = fingerprint_diff(self.fingerprint, expected)
        if fields:
            raise CacheMismatchError(self.path, fields, lines)

    def missing(self) -> dict[int, int]:
        """epoch -> number of unwritten chunks, for epochs that have any."""
        done = read_done(self._group, (self.layout.epochs, self.layout.chunks_per_epoch))
        return {int(e): int((~done[e]).sum()) for e in range(done.shape[0]) if not done[e].all()}

    def check_complete(self, epochs: list[int] | None = None) -> None:
        """Raise IncompleteCacheError naming the epochs (all, or those given) with unwritten units."""
        missing = self.missing()
        if epochs is not None:
            missing = {e: n for e, n in missing.items() if e in set(epochs)}
        if missing:
            raise IncompleteCacheError(self.path, missing, self.layout.chunks_per_epoch)

    def verify(self) -> CacheVerifyReport:
        """Every written unit of every array checked against its checksums (what `kdpipe verify --cache` runs)."""
        report = CacheVerifyReport(self.path, units=self.epochs * self.layout.chunks_per_epoch,
                                   missing=self.missing())
        done = read_done(self._group, (self.epochs, self.layout.chunks_per_epoch))
        for e in range(self.epochs):
            report.damage += check_epoch(self._group, self.layout, e, self.layout.data_arrays, done[e])[1]
            report.checked += int(done[e].sum())
        return report

    # -- reading
    def load_epoch(self, epoch: int) -> _EpochSlice:
        """Read one augmentation epoch's slice from the store, checked: an incomplete epoch raises
        IncompleteCacheError, a unit whose rows fail their checksums CacheDamageError (epoch, chunk named)."""
        if not 0 <= epoch < self.epochs:
            raise IndexError(f"augmentation epoch {epoch} is outside [0, {self.epochs}) in {self.path}")
        self.check_complete([epoch])
        names = ("topk_values", "topk_indices", "weight") if self.layout.topk else ("logits", "weight")
        data, damage = check_epoch(self._group, self.layout, epoch, names,
                                   np.ones(self.layout.chunks_per_epoch, dtype=bool))
        if damage:
            raise CacheDamageError(self.path, [(d.epoch, d.chunk, f"{d.array} {d.why}") for d in damage])
        if self.layout.topk:
            return _EpochSlice(data["weight"], values=data["topk_values"], indices=data["topk_indices"])
        return _EpochSlice(data["weight"], logits=data["logits"])

    def _slice(self, epoch: int) -> _EpochSlice:
        current = self._current
        if current is not None and current[0] == epoch:
            return current[1]
        with self._lock:
            pending, self._next = self._next, None
        if pending is not None and pending[0] == epoch:
            data = pending[1].result()
        else:
            if pending is not None:
                pending[1].cancel()
            data = self.load_epoch(epoch)
        with self._lock:
            self._current = (epoch, data)  # the previous epoch's arrays are freed here
            nxt = (epoch + 1) % self.epochs
            if self.prefetch and nxt != epoch:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="teacher-cache-prefetch")
                self._next = (nxt, self._pool.submit(self.load_epoch, nxt))
        return data

    def lookup(self, epoch: int, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(logits float32 (n, C), weight float32 (n,)) for sample ids at augmentation epoch `epoch`.

        Top-k stores give full log-probabilities (rest of the mass spread uniformly), equivalent as KD targets."""
        ids = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            bad = ids[(ids < 0) | (ids >= self.num_samples)][0]
            raise IndexError(f"sample id {bad} is outside [0, {self.num_samples}) of teacher cache {self.path}")
        s = self._slice(int(epoch))
        if s.logits is not None:
            logits = s.logits[ids].astype(np.float32)
        else:
            logits = expand_topk(s.values[ids], s.indices[ids], self.num_classes)
        return logits, s.weight[ids].copy()

    def close(self) -> None:
        """Stop the prefetch thread and free the slices."""
        with self._lock:
            pool, self._pool, self._current, self._next = self._pool, None, None, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "TeacherCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_cache(cache: Any) -> Any:
    """A TeacherCache from a path, or the object itself (a TeacherCache, or anything with .epochs and
    .lookup(epoch, ids) -> (logits, weight), e.g. a test double)."""
    if isinstance(cache, (str, Path)):
        return TeacherCache(cache)
    if not (hasattr(cache, "epochs") and hasattr(cache, "lookup")):
        raise TypeError("teacher_cache must be a path or have .epochs and .lookup(epoch, ids)")
    return cache


# ---------------------------------------------------------------- the trainer's gate

def validate_cache_for_training(cache: "str | Path | TeacherCache", *, loader: Any, spec: Any, seed: int,
                                image_size: int) -> TeacherCache:
    """Open `cache` and refuse it unless it was made for this loader's shards and classes, this aug spec, seed
    and image size (CacheMismatchError naming each field) and is complete (IncompleteCacheError)."""
    import warnings

    if int(spec.image_size) != int(image_size):
        raise ValueError(f"spec.image_size={spec.image_size} but image_size={image_size}")
    cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
    expected = view_fingerprint(manifest_sha256=loader.manifest_sha256, wnids=list(loader.classes), spec=spec,
                                seed=seed)
    cache.check(expected)
    cache.check_complete()
    backend = getattr(loader, "backend_name", None)
    if backend is not None and backend != cache.fingerprint.get("backend"):
        warnings.warn(f"teacher cache {cache.path} was made with the {cache.fingerprint.get('backend')} backend, "
                      f"training uses {backend}: same crops and flips, pixels differ slightly (colour rounding)",
                      stacklevel=2)
    return cache
