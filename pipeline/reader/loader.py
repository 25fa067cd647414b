"""ImageNet100Loader: epoch order + rank split + resume + backend + teacher cache -> Batch.

The loader owns everything about *which* samples come when (order, ranks, start step, drop_last,
teacher logits); a backend only turns ids into pixels. Every backend class has

    Backend(index, *, spec, seed, train, device, normalize, dtype, num_workers, skip_corrupt)
    .iter_batches(ids, aug_epoch, batch_size) -> iterator of (images, labels, ids), in exactly ids' order

so a new backend (DALI, torch CPU, torch CUDA) plugs in without touching the order logic.
Shards behind a URL (`pipeline.core.remote.is_url`) are streamed: their order comes from `pipeline.reader.stream.stream_plan`
(shards permuted per epoch, contiguous rank shares, a shuffle buffer) and `StreamBackend` reads them in order.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.core.augment import AugSpec, epoch_order
from pipeline.reader.backends import registry
from pipeline.reader.backends.base import Backend
from pipeline.core.batch import Batch, host_to_device
from pipeline.core.device import check_dtype, resolve_device
from pipeline.core.errors import ConfigError
from pipeline.reader.index import ShardIndex
from pipeline.reader.prefetch import prefetch
from pipeline.core.remote import is_url
from pipeline.core.procs import usable_cores



def choose_backend(name: str, device: torch.device) -> str:
    """'auto' -> the registry's pick for the device (today torch everywhere: DALI is opt-in until it has run on a
    GPU); another name -> itself, when registered (pipeline/reader/backends/registry.py)."""
    return registry.choose(name, cuda=device.type == "cuda" and torch.cuda.is_available())


DECODE_DEVICES = ("auto", "cpu", "cuda", "cuda-hw")  # cuda-hw: the GPU's JPEG engines (backends/gpu_jpeg.py)
# auto decodes on the CPU workers when a CUDA machine has at least this many usable cores (docs/loader.md: on
# the H200 machine's 16 cores the workers out-ran nvJPEG sharing the GPU with the step); fewer cores: nvJPEG
CPU_DECODE_MIN_CORES = 12


def choose_decode_device(name: str, device: torch.device, cores: int) -> str:
    """Where the torch backend decodes: the CPU when the output device is the CPU; on CUDA as asked, or for
    'auto' the CPU workers when there are at least CPU_DECODE_MIN_CORES of them, else nvJPEG on the GPU ('auto'
    never picks 'cuda-hw', the hardware JPEG engines, until a GPU run has measured them)."""
    if name not in DECODE_DEVICES:
        raise ConfigError(f"decode_device must be one of {', '.join(DECODE_DEVICES)}, got {name!r}")
    if device.type != "cuda":
        if name in ("cuda", "cuda-hw"):
            raise ConfigError(f"decode_device {name!r} needs a CUDA output device, got {device}")
        return "cpu"
    if name == "auto":
        return "cpu" if cores >= CPU_DECODE_MIN_CORES else "cuda"
    return name


def backend_class(name: str) -> type[Backend]:
    """The class for a concrete backend name (imported lazily: DALI is optional)."""
    return registry.backend_entry(name).load()


def whole_number(name: str, value: Any) -> int:
    """`value` as an int if it is a whole number (a numpy integer too), else a ConfigError naming `name`
    (1.5, "4" and True are no batch size, seed or epoch)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    return int(value)


class ImageNet100Loader:
    """Batches of one split of a shard directory, for one rank: `Batch(images, labels, ids, epoch)`.

    Training (split "train"): a seeded permutation per epoch, padded so every rank gets the same
    number of samples, random views from `sample_params`. Other splits: every sample once, in id
    order, split across ranks, the validation view. See docs/loader.md.
    """

    def __init__(self, shards: str | Path, split: str = "train", batch_size: int = 256, *, seed: int = 0,
                 backend: str = "auto", device: torch.device | str | None = None, spec: AugSpec | None = None,
                 rank: int = 0, world_size: int = 1, num_workers: int | None = None,
                 drop_last: bool | None = None, normalize: bool = True, dtype: torch.dtype | None = None,
                 teacher_cache: Any = None, skip_corrupt: bool = False, check_crc: bool = True,
                 view_epochs: int | None = None, shuffle_buffer: int | None = None, decode_device: str = "auto",
                 prefetch: int | None = None):
        for name, value in (("batch_size", batch_size), ("seed", seed), ("rank", rank), ("world_size", world_size),
                            ("num_workers", num_workers), ("view_epochs", view_epochs), ("prefetch", prefetch)):
            if value is not None:
                whole_number(name, value)
        batch_size, seed, rank, world_size = int(batch_size), int(seed), int(rank), int(world_size)  # numpy ints too
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_workers is not None and num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        dtype = check_dtype(dtype)
        if spec is not None and not isinstance(spec, AugSpec):
            raise TypeError(f"spec must be an AugSpec, got {type(spec).__name__}")
        self.device = resolve_device(device, flag="device")
        self.stream = is_url(shards)  # a URL: read the tars in order (pipeline/reader/stream.py), no random access
        if self.stream and backend not in ("auto", "torch"):
            raise ConfigError(f"backend {backend!r}: shards behind a URL are streamed through the torch backend's "
                              f"CPU workers; use backend='torch' or 'auto'")
        if shuffle_buffer is not None and (not self.stream or shuffle_buffer < 0):
            raise ConfigError("shuffle_buffer (>= 0) applies to shards streamed from a URL")
        # streamed pixels are the torch CPU path's, whatever the device (teacher-cache fingerprints record this)
        self.backend_name = "torch" if self.stream else choose_backend(backend, self.device)
        if self.stream:
            from pipeline.reader.index import RemoteIndex
            from pipeline.reader.stream import DEFAULT_BUFFER

            self.shuffle_buffer = DEFAULT_BUFFER if shuffle_buffer is None else shuffle_buffer
            self.index = RemoteIndex(shards, split)  # streamed samples are always checked (pipeline/reader/stream.py)
        else:
            # raises naming the directory and the splits it has; check_crc: each JPEG's bytes against the crc32
            # recorded by the shard writer (about 1 % of a training view: docs/loader.md "Bad input")
            self.index = ShardIndex(shards, split, check_crc=check_crc)
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.spec = spec or AugSpec()
        self.train = split == "train"
        self.drop_last = self.train if drop_last is None else drop_last
        self.normalize, self.dtype, self.skip_corrupt = normalize, dtype, skip_corrupt
        if teacher_cache is not None and not self.train:
            raise ConfigError(f"teacher_cache holds logits of training views; split {split!r} has none")
        if teacher_cache is not None:
            from pipeline.cache.store import open_cache

            teacher_cache = open_cache(teacher_cache)
        self.teacher_cache = teacher_cache
        if self.teacher_cache is not None and view_epochs not in (None, self.teacher_cache.epochs):
            raise ConfigError(f"view_epochs={view_epochs} disagrees with the teacher cache's "
                             f"{self.teacher_cache.epochs}")
        if view_epochs is not None and view_epochs < 1:
            raise ConfigError(f"view_epochs must be >= 1, got {view_epochs}")
        self.view_epochs = view_epochs if self.teacher_cache is None else self.teacher_cache.epochs
        cached = getattr(self.teacher_cache, "num_samples", len(self.index))
        if cached != len(self.index):
            raise ConfigError(f"teacher cache {getattr(self.teacher_cache, 'path', '')} has "
                              f"{self.teacher_cache.num_samples} samples, split {split!r} of {shards} has "
                              f"{len(self.index)}")
        self.num_workers = usable_cores() if num_workers is None else num_workers
        extra = {}
        self.decode_device: str | None = None  # the torch backend's (DALI decodes as its graph says)
        if self.stream:
            from pipeline.reader.stream import StreamBackend as backend_cls

            self.decode_device = "cpu"  # streamed pixels are the CPU workers' (pipeline/reader/stream.py)
        else:
            backend_cls = backend_class(self.backend_name)
            if registry.backend_entry(self.backend_name).decode_device:
                self.decode_device = self._decode_device(decode_device)
                extra["decode_device"] = self.decode_device
        if prefetch is not None and prefetch < 0:
            raise ConfigError(f"prefetch must be >= 0 batches, got {prefetch}")
        # CUDA: batches are made in a thread on their own stream while the step runs (pipeline/reader/prefetch.py)
        self.prefetch = (2 if self.device.type == "cuda" else 0) if prefetch is None else prefetch
        self.backend = backend_cls(
            self.index, spec=self.spec, seed=seed, train=self.train, device=self.device, normalize=normalize,
            dtype=dtype, num_workers=self.num_workers, skip_corrupt=skip_corrupt, **extra)
        self.epoch, self.start_step = 0, 0
        self._plan: tuple[int, Any] | None = None  # streamed shards: (epoch, StreamPlan) of the last epoch asked

    def _decode_device(self, asked: str) -> str:
        """choose_decode_device, except that with a teacher cache 'auto' decodes where the cache's views were
        decoded (nvJPEG and the CPU decoder differ by ~2 grey levels: the cached logits belong to exact views)."""
        chosen = choose_decode_device(asked, self.device, self.num_workers)
        made = (getattr(self.teacher_cache, "fingerprint", None) or {}).get("decode_device")
        if made is None or made == chosen or self.device.type != "cuda":
            return chosen
        if asked == "auto":
            return made
        warnings.warn(f"teacher cache {getattr(self.teacher_cache, 'path', '')} decoded its views on {made}, this "
                      f"loader decodes on {chosen}: same crops and flips, pixels differ slightly (~2 grey levels)",
                      stacklevel=3)
        return chosen

    # -- what it holds
    @property
    def num_samples(self) -> int:
        return len(self.index)

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    @property
    def classes(self) -> list[str]:
        return list(self.index.classes)

    @property
    def manifest(self) -> dict:
        return self.index.manifest

    @property
    def skipped(self) -> list[tuple[int, str]]:
        """(sample id, reason) of every sample dropped so far with skip_corrupt=True."""
        return list(getattr(self.backend, "skipped", []))

    # -- order
    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch to iterate next; start_step > 0 resumes inside it (the next iteration only)."""
        epoch, start_step = whole_number("epoch", epoch), whole_number("start_step", start_step)
        if epoch < 0 or start_step < 0:
            raise ConfigError(f"epoch and start_step must be >= 0, got {epoch}, {start_step}")
        if start_step > len(self):
            raise ConfigError(f"start_step {start_step} is past the end of the epoch ({len(self)} batches)")
        self.epoch, self.start_step = epoch, start_step

    @property
    def manifest_sha256(self) -> str:
        """sha256 of the shard set's manifest.json (what a teacher cache's fingerprint names)."""
        from pipeline.reader.index import manifest_sha256

        return manifest_sha256(self.index.shard_dir)

    def aug_epoch(self, epoch: int) -> int:
        """The augmentation epoch of a training epoch: epoch mod view_epochs (a teacher cache's epochs), so the
        views repeat exactly as the cached logits do."""
        return epoch % self.view_epochs if self.view_epochs is not None else epoch

    def stream_plan(self, epoch: int) -> Any:
        """Streamed shards: this rank's segments and order for `epoch` (pipeline.reader.stream.stream_plan)."""
        from pipeline.reader.stream import stream_plan

        if self._plan is None or self._plan[0] != epoch:
            shards = self.index.shards
            plan = stream_plan([s["first_id"] for s in shards], [s["count"] for s in shards], self.seed, epoch,
                               self.rank, self.world_size, shuffle=self.train, pad=self.train,
                               buffer=self.shuffle_buffer)
            self._plan = (epoch, plan)
        return self._plan[1]

    def rank_ids(self, epoch: int) -> np.ndarray:
        """This rank's ids for an epoch, after drop_last (the whole epoch, before start_step)."""
        if self.stream:
            ids = self.stream_plan(epoch).order
        else:
            ids = epoch_order(self.num_samples, self.seed, epoch, self.rank, self.world_size,
                              shuffle=self.train, pad=self.train)
        if self.drop_last:
            ids = ids[: len(ids) // self.batch_size * self.batch_size]
        return ids

    def __len__(self) -> int:
        if self.stream:
            from pipeline.reader.stream import stream_count

            n = stream_count(self.num_samples, self.rank, self.world_size, pad=self.train)
        else:
            n = -(-self.num_samples // self.world_size) if self.train else \
                len(range(self.rank, self.num_samples, self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        epoch, start, self.start_step = self.epoch, self.start_step, 0  # read now, not in the prefetch thread
        ids = self.rank_ids(epoch)[start * self.batch_size:]
        plan = {"segments": self.stream_plan(epoch).segments} if self.stream else {}
        aug_epoch = self.aug_epoch(epoch)
        # started here, in the consumer's thread (worker processes die with the thread that forked them)
        pixels = self.backend.iter_batches(ids, aug_epoch, self.batch_size, **plan)
        return prefetch(self._batches(epoch, aug_epoch, ids, pixels), self.device, self.prefetch)

    def _batches(self, epoch: int, aug_epoch: int, ids: np.ndarray, pixels: Iterator) -> Iterator[Batch]:
        """The backend's (images, labels, ids) as Batches, with the teacher cache's rows attached."""
        pos = 0
        for images, labels, batch_ids in pixels:
            batch = Batch(images, labels, batch_ids, epoch)
            n, pos = len(batch_ids), pos + len(batch_ids)
            if self.teacher_cache is not None:
                # Without skipping, a batch is exactly the next slice of `ids`: take the ids from the host
                # copy, so a GPU batch costs no device->host sync (which would drain the training queue).
                host_ids = batch_ids.cpu().numpy() if self.skip_corrupt else ids[pos - n:pos]
                logits, weight = self.teacher_cache.lookup(aug_epoch, host_ids)
                batch.teacher_logits = host_to_device(torch.as_tensor(logits, dtype=torch.float32), self.device)
                batch.teacher_weight = host_to_device(torch.as_tensor(weight, dtype=torch.float32), self.device)
            yield batch

    def iter_views(self, ids: Any, aug_epoch: int, batch_size: int | None = None) -> Iterator[Batch]:
        """Batches of exactly `ids`, in that order, as this loader renders them at augmentation epoch `aug_epoch`
        (training views for the train split): the very pixels a training step sees for (seed, aug_epoch, id).
        For the teacher cache writer and for looking at chosen samples. No teacher logits attached; with
        skip_corrupt, dropped ids are missing from the batches (and listed in `.skipped`)."""
        aug_epoch = whole_number("aug_epoch", aug_epoch)
        batch_size = self.batch_size if batch_size is None else whole_number("batch_size", batch_size)
        if aug_epoch < 0 or batch_size < 1:
            raise ConfigError(f"need aug_epoch >= 0 and batch_size >= 1, got {aug_epoch} and {batch_size}")
        given = np.asarray(ids)
        if given.size and not np.issubdtype(given.dtype, np.integer):  # 1.7 or True is no sample id
            raise ConfigError(f"ids must be whole numbers, got an array of {given.dtype}")
        ids = given.astype(np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise IndexError(f"ids must lie in [0, {self.num_samples}) for split {self.split!r}")
        views = (Batch(images, labels, batch_ids, aug_epoch) for images, labels, batch_ids
                 in self.backend.iter_batches(ids, aug_epoch, batch_size))
        return prefetch(views, self.device, self.prefetch)

    def __repr__(self) -> str:
        return (f"ImageNet100Loader({str(self.index.shard_dir)!r}, split={self.split!r}, "
                f"batch_size={self.batch_size}, backend={self.backend_name!r}, device={str(self.device)!r}, "
                f"rank={self.rank}/{self.world_size}, samples={self.num_samples})")
