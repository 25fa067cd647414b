"""The cache-teacher job: teacher logits for every (augmentation epoch, train sample) into a Zarr store.

Views come from the training loader (`ImageNet100Loader.iter_views`) with the same spec and seed as training,
so each cached row belongs to exactly the view the student sees for (seed, epoch, id). Work is split into units
(epoch x chunk-aligned id range); rank r of W takes pending units r, r+W, ...; finished units are marked in the
store, so a rerun (after kill -9, too) computes only what is missing. The store and its training gate live in
pipeline/cache/store.py.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.atomic import atomic_write_text
from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.core.locks import exclusive_lock
from pipeline.core.log import get_logger
from pipeline.core.progress import progress_bar
from pipeline.cache.store import CacheLayout, TeacherCache, TeacherCacheWriter, cache_fingerprint

from trainer.config import CacheTeacherConfig
from trainer.engine.runtime import (all_gather_list, barrier, dist_info, file_sha256, init_distributed,
                                    load_teacher, precision_dtype, precision_name, teacher_forward)
from trainer.jobs.train import per_rank_batch

logger = get_logger(__name__)

__all__ = ["CacheTeacherConfig", "cache_teacher", "epoch_unit_logits", "write_units"]


def job_lock(out: str | Path):
    """One cache-teacher job per store (a second one, not a rank of the same torchrun job, is refused). The
    lock file sits beside the store (a file inside would trouble zarr's listing) and is removed on exit."""
    out = Path(out)
    return exclusive_lock(out.parent / f".{out.name}.lock", f"teacher cache {out} (another `kdpipe cache-teacher` "
                                                               f"is writing it)")


def epoch_unit_logits(model: torch.nn.Module, loader: Any, layout: CacheLayout, aug_epoch: int, chunks: list[int],
                      batch_size: int, dtype: torch.dtype | None, advance: Callable[[int], Any] = lambda n: None,
                      skipped: list | None = None) -> Iterator[tuple[int, Callable[[], np.ndarray]]]:
    """(chunk, a callable giving its float32 logits (n, C)) for each chunk of `chunks` (ascending) at `aug_epoch`.

    One `iter_views` call per epoch (worker start-up once, not per unit). chunk_n is a multiple of batch_size,
    so every batch lies inside one unit and holds the same ids whichever units are pending: a resumed run
    computes bit-identical logits to an uninterrupted one. A unit's logits leave the device without blocking:
    the callable (run by the store's writer thread) waits for that copy, so the teacher never waits for the host.
    With `skipped` (a list: --skip-corrupt), ids the loader dropped get zero logits (w = 0) and (aug_epoch, id) is
    appended to it; without, a missing id is a bug."""
    if layout.chunk_n % batch_size:
        raise ConfigError(f"the store's chunk ({layout.chunk_n}) must be a multiple of the per-rank batch "
                          f"({batch_size})")
    ids = np.concatenate([np.arange(*layout.id_range(c), dtype=np.int64) for c in chunks])
    device = next(model.parameters()).device
    todo = iter(chunks)
    current, out, seen = next(todo), [], []  # logits and ids stay on the device until the unit is whole

    def finish(chunk: int) -> tuple[int, Callable[[], np.ndarray]]:
        copy = HostCopy(torch.cat(seen) if seen else torch.empty(0, dtype=torch.int64),
                        torch.cat(out) if out else torch.empty((0, layout.num_classes)))

        def logits() -> np.ndarray:
            got, z = copy.wait()
            return _unit_array(got, z.astype(np.float32, copy=False), *layout.id_range(chunk), layout.num_classes,
                               aug_epoch, skipped)

        return chunk, logits

    for k, batch in enumerate(loader.iter_views(ids, aug_epoch, batch_size)):
        advance(min(batch_size, len(ids) - k * batch_size))
        if not len(batch):
            continue
        chunk = (int(ids[k * batch_size]) if skipped is None else _first_id(batch)) // layout.chunk_n
        while chunk != current:  # a batch never straddles two units
            yield finish(current)
            current, out, seen = next(todo), [], []
        out.append(teacher_forward(model, batch.images.to(device, non_blocking=True), dtype))
        seen.append(batch.ids)
    for chunk in [current, *todo]:
        yield finish(chunk)
        out, seen = [], []


def _first_id(batch: Any) -> int:
    return int(batch.ids[0])  # a host sync: only with --skip-corrupt, where a batch may start past its first id


class HostCopy:
    """Device tensors copied to the host without blocking the device's queue; `wait()` gives numpy arrays once
    the copy is done (an event sync, run off the main thread by the caller)."""

    def __init__(self, *tensors: torch.Tensor):
        self.host = [t.detach().to("cpu", non_blocking=True) for t in tensors]  # pinned destinations on CUDA
        self.event = None
        if any(t.device.type == "cuda" for t in tensors):
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return [h.numpy() for h in self.host]


def _unit_array(got: np.ndarray, logits: np.ndarray, lo: int, hi: int, num_classes: int, aug_epoch: int,
                skipped: list | None) -> np.ndarray:
    """The unit's (hi - lo, C) logits from the rows the loader returned; ids it dropped get zero rows."""
    if np.array_equal(got, np.arange(lo, hi)):
        return logits
    missing = np.setdiff1d(np.arange(lo, hi), got)
    if skipped is None or not np.isin(got, np.arange(lo, hi)).all() or np.any(np.diff(got) <= 0):
        raise RuntimeError(f"the loader returned {len(got)} ids for [{lo}, {hi}) at aug epoch {aug_epoch} "
                           f"(first missing: {missing[:5].tolist()}); a cache needs every sample")
    full = np.zeros((hi - lo, num_classes), np.float32)
    full[got - lo] = logits
    skipped += [(aug_epoch, int(i)) for i in missing]
    return full


def write_units(model: torch.nn.Module, loader: Any, writer: TeacherCacheWriter, units: list[tuple[int, int]],
                batch_size: int, dtype: torch.dtype | None, advance: Callable[[int], Any],
                on_unit: Callable[[int, int], Any] | None = None, skipped: list | None = None) -> None:
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
            for chunk, logits in epoch_unit_logits(model, loader, writer.layout, epoch, chunks, batch_size, dtype,
                                                   advance, skipped):
                settle()
                inflight = (epoch, chunk, pool.submit(lambda e, c, z: writer.write_unit(e, c, z()), epoch, chunk,
                                                      logits))
        settle()


def cache_teacher(cfg: CacheTeacherConfig, *, on_unit: Callable[[int, int], Any] | None = None) -> Path:
    """Create or finish the store at cfg.out; under torchrun each rank writes its own units. Returns the path."""
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader

    from trainer.engine.evaluate import require_train_samples

    device, created = init_distributed(cfg.device)
    stack = ExitStack()  # rank 0's job lock
    try:
        rank, world = dist_info()
        batch = per_rank_batch(cfg.batch_size, world)
        dtype = precision_dtype(cfg.precision, device)
        spec = AugSpec(image_size=cfg.image_size, **cfg.view.spec_fields())
        loader = ImageNet100Loader(cfg.shards, "train", batch, seed=cfg.seed, backend=cfg.backend, device=device,
                                   spec=spec, normalize=True, num_workers=cfg.num_workers,
                                   skip_corrupt=cfg.skip_corrupt, decode_device=cfg.decode_device)
        require_train_samples(loader, cfg.shards)
        classes = loader.classes
        if cfg.topk >= len(classes):
            raise ConfigError(f"--topk {cfg.topk} must be below the shards' class count {len(classes)} (0 stores "
                              f"the full logits)")
        model = load_teacher(cfg.teacher, cfg.teacher_weights, classes, device)  # fails before any store exists
        check_teacher_logits(model, loader, cfg, batch, dtype)  # so does a diverged or degenerate teacher
        fp = cache_fingerprint(manifest_sha256=loader.manifest_sha256, wnids=classes, spec=spec, seed=cfg.seed,
                               teacher=cfg.teacher, weights_sha256=file_sha256(cfg.teacher_weights),
                               precision=precision_name(dtype), backend=loader.backend_name, topk=cfg.topk,
                               decode_device=getattr(loader, "decode_device", None))
        layout = CacheLayout(cfg.epochs, loader.num_samples, len(classes), cfg.chunk_n, cfg.topk)
        if rank == 0:  # one creator; the others reopen (and re-check) once it exists
            stack.enter_context(job_lock(cfg.out))
            writer = TeacherCacheWriter.create(cfg.out, layout, fp)
        barrier()
        if rank != 0:
            writer = TeacherCacheWriter.create(cfg.out, layout, fp)
        units = writer.pending_units(rank, world)
        barrier()  # every rank has read the same progress before anyone writes
        todo = sum(hi - lo for lo, hi in (layout.id_range(c) for _, c in units))
        desc = f"cache-teacher {cfg.teacher} ({precision_name(dtype)}, {loader.backend_name})"
        desc += f" rank {rank}/{world}" if world > 1 else ""
        skipped: list | None = [] if cfg.skip_corrupt else None
        with progress_bar(total=int(todo), unit="img", desc=desc, enabled=cfg.progress and rank == 0) as bar:
            write_units(model, loader, writer, units, batch, dtype, bar.update, on_unit, skipped)
        if skipped is not None:
            _record_skipped(cfg.out, skipped, rank)
        barrier()
        if rank == 0:
            TeacherCache(cfg.out, prefetch=False).check_complete()
        return Path(cfg.out)
    finally:
        stack.close()
        if created:
            torch.distributed.destroy_process_group()


def teacher_logits_problem(logits: np.ndarray, full_logits: bool) -> str | None:
    """What makes these teacher logits unusable for a cache, in words, or None. Non-finite values and (when
    the store keeps full logits as float16) values beyond float16's range mean a diverged teacher; the same
    logit for every class, or the same logits for every image, mean a zeroed or input-blind one."""
    z = np.asarray(logits, dtype=np.float64)
    bad = int((~np.isfinite(z)).sum())
    if bad:
        return f"{bad} of {z.size} logits are not finite (nan or inf)"
    peak = float(np.abs(z).max()) if z.size else 0.0
    if full_logits and peak > float(np.finfo(np.float16).max):
        return f"logits reach |z| = {peak:.3g}, beyond the 65504 of the float16 the cache stores"
    if z.size and np.all(z.max(axis=1) == z.min(axis=1)):
        return "every image gets the same logit for every class (a zeroed or constant classifier)"
    if len(z) > 1 and np.all(z == z[0]):
        return "every image gets the same logits (the output does not depend on the image)"
    return None


def check_teacher_logits(model: torch.nn.Module, loader: Any, cfg: CacheTeacherConfig, batch_size: int,
                         dtype: torch.dtype | None) -> None:
    """Refuse a diverged or degenerate teacher before any store is created: the first batch the cache would
    compute (augmentation epoch 0, the first ids) goes through the teacher, and a problem is one line naming
    the weights file. Without it such a teacher surfaced as a writer-thread error after the store existed."""
    n = min(batch_size, loader.num_samples)
    device = next(model.parameters()).device
    rows = [teacher_forward(model, b.images.to(device), dtype).cpu().numpy()
            for b in loader.iter_views(np.arange(n), 0, n) if len(b)]
    if not rows:
        return
    problem = teacher_logits_problem(np.concatenate(rows), full_logits=cfg.topk == 0)
    if problem:
        raise CheckpointError(f"--teacher-weights {cfg.teacher_weights}: {problem} on the first {n} training "
                              f"views; the {cfg.teacher} teacher diverged or was never trained. Retrain it (lower "
                              f"lr, warm-up) or give other weights; nothing was cached")


def _record_skipped(out: str, skipped: list[tuple[int, int]], rank: int) -> None:
    """OUT.skipped.tsv beside the store: the (augmentation epoch, sample id) rows stored without a teacher signal."""
    skipped = all_gather_list(skipped)
    path = Path(f"{out}.skipped.tsv")
    if rank != 0 or (not skipped and not path.is_file()):
        return
    old = {tuple(map(int, line.split("\t")[:2])) for line in path.read_text().splitlines()[1:] if line} \
        if path.is_file() else set()
    rows = sorted(old | set(skipped))
    atomic_write_text(path, "epoch\tsample_id\n" + "".join(f"{e}\t{i}\n" for e, i in rows))
    logger.warning(f"cache-teacher: {len(rows)} corrupt (epoch, sample) views stored with w = 0, listed in {path}")
