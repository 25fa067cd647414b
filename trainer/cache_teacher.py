"""The cache-teacher job: teacher logits for every (augmentation epoch, train sample) into a Zarr store.

Views come from the same loader backend, spec and seed as training, so each cached row belongs to exactly
the view the student sees for (seed, epoch, id). Work is split into units (epoch x chunk-aligned id range);
rank r of W takes pending units r, r+W, ...; finished units are marked in the store, so a rerun (after
kill -9, too) computes only what is missing. Also here: `validate_cache_for_training`, the trainer's gate.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import BusyError
from pipeline.teacher_cache import (
    DEFAULT_CHUNK_N, CacheLayout, TeacherCache, TeacherCacheWriter, cache_fingerprint, open_cache,
    view_fingerprint)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class CacheTeacherConfig:
    shards: str  # directory written by `kdpipe shard`
    out: str  # the Zarr store to create or resume, e.g. teacher.zarr
    teacher_weights: str  # local file: kdpipe checkpoint, C-way or 1k-way state dict
    teacher: str = "resnet50"
    epochs: int = 1  # augmentation epochs E; training epoch e uses e mod E
    seed: int = 0  # must equal the training seed
    image_size: int = 224  # must equal the training crop size
    topk: int = 0  # 0: full logits; K: top-K log-probabilities + indices (for 1000-class teachers)
    batch_size: int = 256  # teacher batch; never crosses a unit
    chunk_n: int = DEFAULT_CHUNK_N  # samples per store chunk and per unit of work
    backend: str = "auto"  # loader backend: auto | dali | torch
    num_workers: int | None = None
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if min(self.epochs, self.batch_size, self.chunk_n, self.image_size) < 1 or self.topk < 0:
            problems.append("epochs, batch_size, chunk_n and image_size must be >= 1, topk >= 0")
        if self.chunk_n % self.batch_size:
            problems.append(f"chunk_n ({self.chunk_n}) must be a multiple of batch_size ({self.batch_size}), so "
                            f"batches never straddle two units and a resumed run computes identical logits")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if problems:
            raise ValueError("invalid cache-teacher options: " + "; ".join(problems))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed (teacher weights can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 autocast on CUDA (the trainer's default), fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """The forward's autocast context: AMP in bf16/fp16, nothing in fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def load_teacher(name: str, weights: str | Path, classes: list[str], device: torch.device) -> torch.nn.Module:
    """The frozen teacher: weights from a local file, eval mode, no grad, channels_last on `device`."""
    from trainer.models import build_model, load_weights

    model = load_weights(build_model(name, len(classes)), weights, name=name, classes=classes)
    model.eval().requires_grad_(False)
    return model.to(device, memory_format=torch.channels_last)


@torch.no_grad()
def teacher_logits(model: torch.nn.Module, images: torch.Tensor, precision: str) -> torch.Tensor:
    """float32 logits of a normalised NCHW batch already on the model's device."""
    device = next(model.parameters()).device
    with autocast(precision, device):
        out = model(images.contiguous(memory_format=torch.channels_last))
    return out.float()


_HELD_LOCKS: set[Path] = set()  # POSIX locks do not conflict within one process: track those ourselves


@contextmanager
def exclusive_job_lock(out: str | Path) -> Iterator[None]:
    """One cache-teacher job per store: a second one (not a rank of the same torchrun job) is refused.

    A POSIX record lock (lockf), not flock: worker processes forked by the loader do not inherit it, so a
    kill -9 of the job frees the store at once, even while orphaned workers linger. The lock file sits beside
    the store (a file inside would trouble zarr's hierarchy listing)."""
    import fcntl

    path = (Path(out).parent / f".{Path(out).name}.lock").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            if path in _HELD_LOCKS:
                raise BlockingIOError
            fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            raise BusyError(f"another `kdpipe cache-teacher` is writing {out}") from None
        _HELD_LOCKS.add(path)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(path)


# ---------------------------------------------------------------- distributed

def dist_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; (0, 1) when not launched by torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _init_dist(world_size: int, device: torch.device) -> bool:
    """Join torchrun's process group if there is one to join; True if this call created it."""
    if world_size == 1 or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


# ---------------------------------------------------------------- views

def open_views(cfg: CacheTeacherConfig, spec: Any, device: torch.device) -> tuple[Any, str]:
    """The training loader's backend for cfg's shards/spec/seed (normalised float images), and its name.

    The cache needs every train id of a unit, in order, at a given augmentation epoch: that is the
    backend's `iter_batches(ids, aug_epoch, batch_size)`, the very call the loader makes for a training
    batch, so a cached row and a training view are the same pixels."""
    from pipeline.loader import ImageNet100Loader

    loader = ImageNet100Loader(cfg.shards, "train", cfg.batch_size, seed=cfg.seed, backend=cfg.backend,
                               device=device, spec=spec, normalize=True, num_workers=cfg.num_workers)
    return loader.backend, loader.backend_name


def epoch_unit_logits(model: torch.nn.Module, views: Any, layout: CacheLayout, aug_epoch: int, chunks: list[int],
                      batch_size: int, precision: str, advance: Callable[[int], Any] = lambda n: None
                      ) -> Iterator[tuple[int, np.ndarray]]:
    """(chunk, float32 logits (n, C)) for each chunk of `chunks` at `aug_epoch`, from one backend stream.

    One `iter_batches` call per epoch (worker start-up once, not per unit). chunk_n is a multiple of
    batch_size, so every batch lies inside one unit and holds the same ids whichever units are pending:
    a resumed run computes bit-identical logits to an uninterrupted one."""
    if layout.chunk_n % batch_size:
        raise ValueError(f"the store's chunk ({layout.chunk_n}) must be a multiple of the batch size ({batch_size})")
    ranges = [layout.id_range(c) for c in chunks]
    ids = np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in ranges])
    device = next(model.parameters()).device
    pending = iter(zip(chunks, ranges))
    chunk, (lo, hi) = next(pending)
    out: list[torch.Tensor] = []  # logits and ids stay on the device until the unit is whole:
    seen: list[torch.Tensor] = []  # one host sync per unit, not per batch
    for images, _labels, got in views.iter_batches(ids, aug_epoch, batch_size):
        out.append(teacher_logits(model, images.to(device, non_blocking=True), precision))
        seen.append(got)
        advance(len(got))
        if sum(map(len, seen)) >= hi - lo:
            _check_ids(torch.cat(seen).cpu().numpy(), lo, hi, aug_epoch)
            yield chunk, torch.cat(out).cpu().numpy()
            out, seen = [], []
            chunk, (lo, hi) = next(pending, (None, (0, 0)))
    if chunk is not None:
        _check_ids(torch.cat(seen).cpu().numpy() if seen else np.empty(0, np.int64), lo, hi, aug_epoch)


def _check_ids(seen: np.ndarray, lo: int, hi: int, aug_epoch: int) -> None:
    """The backend must return exactly ids lo..hi-1 in order: a cache needs every sample."""
    if not np.array_equal(seen, np.arange(lo, hi)):
        missing = np.setdiff1d(np.arange(lo, hi), seen)[:5].tolist()
        raise RuntimeError(f"the backend returned {len(seen)} ids for [{lo}, {hi}) at aug epoch {aug_epoch} "
                           f"(first missing: {missing}); a cache needs every sample")


# ---------------------------------------------------------------- the job

def write_units(model: torch.nn.Module, views: Any, writer: TeacherCacheWriter, units: list[tuple[int, int]],
                batch_size: int, precision: str, advance: Callable[[int], Any],
                on_unit: Callable[[int, int], Any] | None = None) -> None:
    """Compute and store `units` in order. A writer thread stores one unit (entropy, top-k, zstd, fsync)
    while the teacher runs the next; at most one is in flight, and on_unit(e, c) runs once (e, c) is on disk."""
    with ThreadPoolExecutor(1, thread_name_prefix="cache-writer") as pool:
        inflight: tuple[int, int, Future] | None = None

        def settle() -> None:
            nonlocal inflight
            if inflight is not None:
                (e, c, done), inflight = inflight, None
                done.result()  # re-raises a failed write here
                if on_unit is not None:
                    on_unit(e, c)

        for epoch in sorted({e for e, _ in units}):
            chunks = [c for e, c in units if e == epoch]
            for chunk, logits in epoch_unit_logits(model, views, writer.layout, epoch, chunks, batch_size,
                                                   precision, advance):
                settle()
                inflight = (epoch, chunk, pool.submit(writer.write_unit, epoch, chunk, logits))
        settle()


def cache_teacher(cfg: CacheTeacherConfig, *, on_unit: Callable[[int, int], Any] | None = None) -> Path:
    """Create or finish the store at cfg.out; under torchrun each rank writes its own units. Returns the path."""
    from tqdm import tqdm

    from pipeline.augment import AugSpec
    from pipeline.index import read_manifest
    from pipeline.shards import manifest_sha256

    rank, world = dist_env()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.precision, device)
    created = _init_dist(world, device)
    stack = ExitStack()  # rank 0's job lock
    try:
        manifest = read_manifest(cfg.shards)
        wnids = [c["wnid"] for c in manifest["classes"]]
        spec = AugSpec(image_size=cfg.image_size)
        views, backend_name = open_views(cfg, spec, device)
        model = load_teacher(cfg.teacher, cfg.teacher_weights, wnids, device)  # fails before any store exists
        fp = cache_fingerprint(manifest_sha256=manifest_sha256(cfg.shards), wnids=wnids, spec=spec,
                               seed=cfg.seed, teacher=cfg.teacher, weights_sha256=file_sha256(cfg.teacher_weights),
                               precision=precision, backend=backend_name, topk=cfg.topk)
        layout = CacheLayout(cfg.epochs, int(manifest["splits"]["train"]["count"]), len(wnids),
                             cfg.chunk_n, cfg.topk)
        if rank == 0:  # one creator; the others reopen (and re-check) once it exists
            stack.enter_context(exclusive_job_lock(cfg.out))
            writer = TeacherCacheWriter.create(cfg.out, layout, fp)
        _barrier()
        if rank != 0:
            writer = TeacherCacheWriter.create(cfg.out, layout, fp)
        units = writer.pending_units(rank, world)
        _barrier()  # every rank has read the same progress before anyone writes
        todo = sum(hi - lo for lo, hi in (layout.id_range(c) for _, c in units))
        desc = f"cache-teacher {cfg.teacher} ({precision}, {backend_name})"
        desc += f" rank {rank}/{world}" if world > 1 else ""
        with tqdm(total=int(todo), unit="img", desc=desc, disable=not cfg.progress or rank != 0) as bar:
            write_units(model, views, writer, units, cfg.batch_size, precision, bar.update, on_unit)
        _barrier()
        if rank == 0:
            TeacherCache(cfg.out, prefetch=False).check_complete()
        return Path(cfg.out)
    finally:
        stack.close()
        if created:
            torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- the trainer's gate

def validate_cache_for_training(cache: str | Path | TeacherCache, *, loader: Any, spec: Any, seed: int,
                                image_size: int) -> TeacherCache:
    """Open `cache` and refuse it unless it was made for this loader's shards and classes, this aug spec,
    seed and image size (CacheMismatchError naming each field) and is complete (IncompleteCacheError)."""
    from pipeline.shards import manifest_sha256

    if int(spec.image_size) != int(image_size):
        raise ValueError(f"spec.image_size={spec.image_size} but image_size={image_size}")
    cache = open_cache(cache)
    expected = view_fingerprint(manifest_sha256=manifest_sha256(loader.index.shard_dir), wnids=list(loader.classes),
                                spec=spec, seed=seed)
    cache.check(expected)
    cache.check_complete()
    backend = getattr(loader, "backend_name", None)
    if backend is not None and backend != cache.fingerprint.get("backend"):
        warnings.warn(f"teacher cache {cache.path} was made with the {cache.fingerprint.get('backend')} backend, "
                      f"training uses {backend}: same crops and flips, pixels differ slightly (colour rounding)",
                      stacklevel=2)
    return cache
