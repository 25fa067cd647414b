"""Torch backend: sample ids -> augmented batches with torchvision's decoder, no DALI needed.

CPU (any device without CUDA): DataLoader worker processes each build whole batches with the CPU pixel
path of `cpu_views` (ROI decode when nvImageCodec is installed, uint8 antialiased resize, uint8 flip,
float32 numpy colour rounded straight into the batch's shared-memory slot) and send one uint8 NHWC
tensor per batch; the main process only normalises (on the target device). Workers die with the main
process (PR_SET_PDEATHSIG), so a kill -9 leaves no orphans.
CUDA: `decode_jpeg(list, device="cuda")` decodes a batch at once on the GPU (or, with decode_device
"cuda-hw", nvImageCodec on the GPU's hardware JPEG engines: gpu_jpeg.py); crop, resize and colour run there as
batched torch ops (`augment_decoded`, which the CPU tests also exercise).
The pixel definition all backends follow is in docs/loader.md.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline.core.augment import AugParams, AugSpec, sample_params, val_geometry
from pipeline.core.batch import IMAGENET_MEAN_255, IMAGENET_STD_255, host_to_device, normalize_images
from pipeline.core.errors import CorruptSampleError
from pipeline.core.procs import die_with_parent, watch_parent
from pipeline.reader.backends.base import GREY, CarryErrors, SkipLog, raise_carried, sample_error, size_mismatch
from pipeline.reader.backends.cpu_views import crop_box, decode, decode_region, resize_uint8, train_view, val_view, view_from_crop

if TYPE_CHECKING:
    from pipeline.reader.index import ShardIndex

__all__ = ["TorchBackend", "BatchBuilder", "augment_decoded", "normalize_nhwc", "decode", "train_view", "val_view",
           "resize_uint8", "sample_error", "GREY"]


def normalize_nhwc(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (u - 255 mean) / (255 std) as NCHW channels_last in dtype (float32 math).

    Scale and offset are pre-tiled to (H, W, 3): broadcasting a 3-vector over the innermost dimension
    runs ~3x slower on the CPU than this same-shape multiply-add."""
    scale, offset = _norm_pattern(tuple(x.shape[1:]), x.device)
    if x.device.type == "cpu":
        # numpy: one thread, as fast as torch's one-thread kernels, and no intra-op pool spinning on
        # cores the worker processes need (measured: 2 torch threads here lowered throughput). And
        # numpy's allocation: it asks for transparent huge pages on big arrays, so the 38 MB of a
        # 64x224² float32 batch fault in as 2 MB pages (0.37 -> 0.15 ms an image, docs/loader.md).
        o = np.empty(tuple(x.shape), np.float32)
        np.multiply(x.numpy(), scale.numpy(), out=o)
        np.add(o, offset.numpy(), out=o)
        out = torch.from_numpy(o)
    else:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        out.copy_(x).mul_(scale).add_(offset)
    return out.to(dtype).permute(0, 3, 1, 2)


_NORM_PATTERNS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _norm_pattern(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (shape, str(device))
    if key not in _NORM_PATTERNS:
        scale = torch.tensor([1.0 / s for s in IMAGENET_STD_255], device=device).expand(shape).contiguous()
        offset = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN_255, IMAGENET_STD_255)], device=device)
        _NORM_PATTERNS[key] = (scale, offset.expand(shape).contiguous())
    return _NORM_PATTERNS[key]


def shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor allocated straight in shared memory (as DataLoader's collate does):
    `empty().share_memory_()` would allocate twice and copy."""
    n = int(np.prod(shape))
    try:
        storage = torch.UntypedStorage._new_shared(n)
    except AttributeError:  # private API gone: the slower public way
        return torch.empty(shape, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


PREFETCH = 4  # batches each worker process works ahead


class BatchBuilder(torch.utils.data.Dataset):
    """Item k = batch k of `chunks`, built whole in one worker: uint8 NHWC images written straight into
    shared memory. With `slots` (a ring of shared batches made once by the main process before the
    workers fork) item k is written into slots[k % len(slots)] and only its slot number travels:
    no fresh shared memory per batch (allocating and zeroing it cost ~0.1 ms an image)."""

    def __init__(self, index: ShardIndex, spec: AugSpec, seed: int, aug_epoch: int, train: bool,
                 chunks: Sequence[np.ndarray], skip_corrupt: bool, slots: Sequence[torch.Tensor] = ()):
        self.index, self.spec, self.seed, self.aug_epoch = index, spec, seed, aug_epoch
        self.train, self.chunks, self.skip_corrupt = train, list(chunks), skip_corrupt
        self.slots = list(slots)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict:
        return self.build(k, self.aug_epoch, self.chunks[k])

    def build(self, k: int, aug_epoch: int, ids: np.ndarray) -> dict:
        """Batch `ids` at `aug_epoch`, the k-th of its stream (k picks the slot)."""
        idx, s = self.index, self.spec.image_size
        p = sample_params(self.spec, self.seed, aug_epoch, ids, idx.heights[ids], idx.widths[ids]) \
            if self.train else None
        slot = k % len(self.slots) if self.slots else -1
        out = self.slots[slot][:len(ids)] if self.slots else torch.empty((len(ids), s, s, 3), dtype=torch.uint8)
        out_np = out.numpy()
        keep: list[int] = []
        log = SkipLog(self.skip_corrupt)
        for i, sid in enumerate(ids.tolist()):
            try:
                self._render(sid, p, i, out_np[len(keep)])
            except CorruptSampleError as e:
                log.record(e, sid)
                continue
            keep.append(i)
        sel = ids[np.asarray(keep, dtype=np.int64)]
        return {"images": None if self.slots else out[:len(keep)], "slot": slot, "count": len(keep),
                "ids": torch.from_numpy(sel), "labels": torch.from_numpy(idx.labels[sel].astype(np.int64)),
                "skipped": log.skipped}

    def _render(self, sid: int, p: AugParams | None, i: int, slot: np.ndarray) -> None:
        """One sample's view into its batch slot; any failure becomes the sample's CorruptSampleError."""
        idx = self.index
        try:
            data = idx.read(sid)
            expected = (int(idx.heights[sid]), int(idx.widths[sid]))
            if p is not None:
                view_from_crop(decode_region(data, expected, crop_box(p, i)), p, i, self.spec.image_size, slot)
            else:
                slot[...] = val_view(decode_region(data, expected), self.spec).numpy()
        except CorruptSampleError:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            raise sample_error(idx, sid, e) from e


class KeyedBuilder(BatchBuilder):
    """BatchBuilder whose items are keys (k, aug_epoch, ids): one set of persistent workers serves every epoch."""

    def __init__(self, index: ShardIndex, spec: AugSpec, seed: int, train: bool, skip_corrupt: bool,
                 slots: Sequence[torch.Tensor]):
        super().__init__(index, spec, seed, 0, train, [], skip_corrupt, slots)

    def __getitem__(self, key: tuple[int, int, np.ndarray]) -> dict:  # type: ignore[override]
        return self.build(*key)


class _Keys(torch.utils.data.Sampler):
    """The DataLoader's sampler: this call's keys, replaced before each pass (read in the main process)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, int, np.ndarray]] = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class WorkerPool:
    """Worker processes that live as long as their backend: forked once, with the ring of shared batch slots
    made once, instead of a fresh DataLoader (fork, slots, an empty pipeline) every epoch.

    `run` must be called from a thread that outlives the pool (the loader calls it from the consumer's
    thread, before handing the batches to its prefetch thread): workers die with the thread that forked them
    (PR_SET_PDEATHSIG). A new pass drains what the previous one left in flight (DataLoader's persistent
    reset), so a slot is never written by an old pass while the new one reads it."""

    def __init__(self, index: ShardIndex, spec: AugSpec, seed: int, train: bool, skip_corrupt: bool,
                 batch_size: int, workers: int):
        s = spec.image_size
        # The ring: while the consumer holds item k, at most workers * PREFETCH later items are in flight,
        # so with more slots than that no worker writes a slot still being read.
        self.slots = [shared_uint8((batch_size, s, s, 3)) for _ in range(workers * PREFETCH + 2)]
        self.batch_size, self.workers, self._keys, self.passes = batch_size, workers, _Keys(), 0
        builder = KeyedBuilder(index, spec, seed, train, skip_corrupt, self.slots)
        self._dl = torch.utils.data.DataLoader(
            CarryErrors(builder), batch_size=None, sampler=self._keys, num_workers=workers,
            persistent_workers=True, prefetch_factor=PREFETCH,
            worker_init_fn=worker_init_for(os.getpid()))

    def run(self, aug_epoch: int, chunks: Sequence[np.ndarray]) -> Iterator[dict]:
        """Items (dicts of BatchBuilder.build) for `chunks` in order; the workers start on them at once. One pass
        at a time: starting another ends the previous one (reading on from it is a RuntimeError)."""
        self._keys.keys = [(k, aug_epoch, chunk) for k, chunk in enumerate(chunks)]
        self.passes += 1
        return self._items(iter(self._dl), self.passes)

    def _items(self, items: Iterator[dict], this_pass: int) -> Iterator[dict]:
        while True:
            if self.passes != this_pass:
                raise RuntimeError("a loader's torch backend iterates one pass at a time: another pass (a new "
                                   "iter(loader) or iter_views) started before this one ended")
            item = next(items, None)
            if item is None:
                return
            yield item

    def image(self, item: dict) -> torch.Tensor:
        return self.slots[item["slot"]][:item["count"]]

    def close(self) -> None:
        """Stop the workers now. After an error the pool is dropped; left to the garbage collector, its live
        DataLoader iterator could be inherited by the next loader's forked workers, whose clean-up of it prints
        "AssertionError: can only test a child process" tracebacks."""
        it = getattr(self._dl, "_iterator", None)
        if it is not None:
            it._shutdown_workers()  # idempotent; marks the iterator shut down, so no copy of it acts again
            self._dl._iterator = None


def worker_init_for(parent_pid: int) -> Callable[[int], None]:
    """worker_init for workers forked now, from the calling thread (see worker_init)."""
    return functools.partial(worker_init, parent_pid=parent_pid,
                             by_main_thread=threading.current_thread() is threading.main_thread())


def worker_init(_: int, parent_pid: int, by_main_thread: bool = True) -> None:
    """DataLoader worker set-up of every kdpipe loader (also the streamed one). A kill -9 of the main process
    takes the workers with it: at once (PR_SET_PDEATHSIG) when the main thread forked them; by polling when
    another thread did, since PR_SET_PDEATHSIG would fire when that thread ends (a loader first iterated in a
    short-lived thread), with the loader still in use."""
    if by_main_thread:
        die_with_parent(parent_pid)
    else:
        watch_parent(parent_pid)
    torch.set_num_threads(1)  # one process per core; intra-op threads would fight over the same cores


def aa_weights(in_size: torch.Tensor, out_total: torch.Tensor, first: torch.Tensor, size: int, pad: int
               ) -> torch.Tensor:
    """Antialiased bilinear resampling as matrices: (N, size, pad) float32, row i of sample n = the input
    weights of output pixel first[n] + i of a resize in_size[n] -> out_total[n] (PIL's and torch's
    `interpolate(antialias=True)` rule: a triangle filter stretched by the scale when shrinking,
    centred at scale * (i + 0.5), cut at the image's edge, rows normalised). Columns >= in_size are 0."""
    dev = in_size.device
    scale = (in_size.double() / out_total.double()).view(-1, 1, 1)
    stretch = scale.clamp(min=1.0)  # the filter widens only when shrinking
    steps = torch.arange(size, device=dev, dtype=torch.float64).view(1, -1, 1)
    centre = scale * (first.double().view(-1, 1, 1) + steps + 0.5)
    j = torch.arange(pad, device=dev, dtype=torch.float64).view(1, 1, -1)
    w = (1.0 - ((j + 0.5 - centre) / stretch).abs()).clamp_(min=0.0) * (j < in_size.view(-1, 1, 1))
    return (w / w.sum(-1, keepdim=True)).float()


PAD_BUDGET = 256 << 20  # bytes of one zero-padded float32 group in resize_batch (a few huge images split it)


def resize_batch(crops: Sequence[torch.Tensor], rows: tuple, cols: tuple, size: int) -> torch.Tensor:
    """Decoded uint8 (3, h, w) regions -> float32 (N, 3, size, size): each group with two batched mat-muls
    (Wh @ X @ Ww^T) instead of one interpolate call per image. rows / cols = (in_size, out_total, first)
    per sample as int64 tensors on the device (see aa_weights). Crops are zero-padded to the largest of
    their group; groups (consecutive, in order) are cut so a padded group stays under PAD_BUDGET."""
    dev, out, k = crops[0].device, [], 0
    while k < len(crops):
        hp, wp, end = 0, 0, k
        while end < len(crops):
            h, w = max(hp, int(crops[end].shape[1])), max(wp, int(crops[end].shape[2]))
            if end > k and (end - k + 1) * 3 * h * w * 4 > PAD_BUDGET:
                break
            hp, wp, end = h, w, end + 1
        x = torch.zeros((end - k, 3, hp, wp), dtype=torch.float32, device=dev)
        for j in range(k, end):
            x[j - k, :, :crops[j].shape[1], :crops[j].shape[2]] = crops[j]
        wh = aa_weights(*(t[k:end] for t in rows), size, hp)
        ww = aa_weights(*(t[k:end] for t in cols), size, wp)
        out.append(torch.matmul(torch.matmul(wh.unsqueeze(1), x), ww.transpose(1, 2).unsqueeze(1)))
        k = end
    return torch.cat(out)


def augment_decoded(imgs: Sequence[torch.Tensor], p: AugParams | None, spec: AugSpec) -> torch.Tensor:
    """Decoded (3, H, W) uint8 images (any device) -> uint8 (N, 3, S, S), all in batched torch ops.

    The GPU path. Same definition as the CPU path; colour stays in float32 (no rounding of y2).
    Per image only the crop's copy into a padded batch remains; resize, colour and flip are one set
    of kernels for the whole batch (a handful of launches instead of ~4 per image).
    """
    s, n = spec.image_size, len(imgs)
    if n == 0:
        return torch.empty((0, 3, s, s), dtype=torch.uint8)
    dev = imgs[0].device
    if p is None:  # validation: the resize to (rh, rw), restricted to the centre crop's rows and columns
        geo = [val_geometry(spec, int(im.shape[1]), int(im.shape[2])) for im in imgs]
        crops = list(imgs)
        hs, ws = [int(im.shape[1]) for im in imgs], [int(im.shape[2]) for im in imgs]
        rows = (hs, [g[0] for g in geo], [g[2][0] for g in geo])
        cols = (ws, [g[1] for g in geo], [g[2][1] for g in geo])
    else:
        boxes = [crop_box(p, i) for i in range(n)]
        crops = [im[:, t:t + h, l:l + w] for im, (t, l, h, w) in zip(imgs, boxes)]
        rows = ([b[2] for b in boxes], [s] * n, [0] * n)
        cols = ([b[3] for b in boxes], [s] * n, [0] * n)
    as_t = functools.partial(torch.tensor, dtype=torch.int64, device=dev)
    x = resize_batch(crops, tuple(map(as_t, rows)), tuple(map(as_t, cols)), s)
    x = x.clamp_(0, 255).round_()  # the resize output is uint8 in the definition
    if p is not None:
        b, c, sat = (torch.as_tensor(a, device=dev).view(-1, 1, 1, 1) for a in (p.brightness, p.contrast, p.saturation))
        wg = torch.tensor(GREY, device=dev).view(1, 3, 1, 1)
        y1 = (x * b).clamp_(0, 255)
        m = (y1 * wg).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        y2 = (y1 * c + (1 - c) * m).clamp_(0, 255)
        x = (y2 * sat + (1 - sat) * (y2 * wg).sum(1, keepdim=True)).clamp_(0, 255)
        flip = torch.as_tensor(p.flip, device=dev).view(-1, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    return x.round_().to(torch.uint8).contiguous(memory_format=torch.channels_last)


class TorchBackend:
    """The torch backend (constructor and `iter_batches` as every backend: see pipeline/reader/loader.py)."""

    name = "torch"

    def __init__(self, index: ShardIndex, *, spec: AugSpec, seed: int, train: bool, device: torch.device,
                 normalize: bool, dtype: torch.dtype, num_workers: int, skip_corrupt: bool,
                 decode_device: str | None = None):
        self.index, self.spec, self.seed, self.train = index, spec, seed, train
        self.device, self.normalize, self.dtype = torch.device(device), normalize, dtype
        self.num_workers, self.skip_corrupt = num_workers, skip_corrupt
        self._log = SkipLog(skip_corrupt)
        self._pool: WorkerPool | None = None  # CPU worker processes, made on first use, kept across epochs
        # "cuda": batched nvJPEG decode + torch ops on the GPU, in this process (the loader's prefetch thread);
        # "cuda-hw": the same, decoded by the GPU's hardware JPEG engines (nvImageCodec's decoders, made here);
        # "cpu": worker processes, uint8 crops copied to the device and normalised there. None: cuda on CUDA.
        # (Tests set device_decode on the CPU to run the GPU code with torchvision's CPU decoder, and
        # hw_decoder to a HardwareJpegDecoder on nvImageCodec's CPU backend.)
        self.device_decode = (decode_device or self.device.type) in ("cuda", "cuda-hw")
        self.hw_decoder = None
        if decode_device == "cuda-hw":
            from pipeline.reader.backends.gpu_jpeg import HardwareJpegDecoder

            self.hw_decoder = HardwareJpegDecoder(self.device)

    @property
    def skipped(self) -> list[tuple[int, str]]:
        """(sample id, reason) of every sample dropped so far (skip_corrupt=True)."""
        return self._log.skipped

    def iter_batches(self, ids: np.ndarray, aug_epoch: int, batch_size: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, ids) for `ids` in exactly this order, `batch_size` at a time.

        Not a generator: the CPU workers start (and, the first time, fork) in the calling thread, which the
        loader keeps alive; the batches may then be consumed in another thread."""
        ids = np.asarray(ids, dtype=np.int64)
        chunks = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        if self.device_decode:
            return self._iter_device(chunks, aug_epoch)
        workers = min(self.num_workers, len(chunks))
        if workers == 0:
            builder = BatchBuilder(self.index, self.spec, self.seed, aug_epoch, self.train, chunks,
                                   self.skip_corrupt)
            return self._deliver((builder[k] for k in range(len(chunks))), None)
        pool = self._pool
        if pool is None or pool.batch_size != batch_size or pool.workers < workers:
            self._pool = pool = None  # the old workers exit once unreferenced
            pool = self._pool = WorkerPool(self.index, self.spec, self.seed, self.train, self.skip_corrupt,
                                           batch_size, workers)
        return self._deliver(pool.run(aug_epoch, chunks), pool)

    def _deliver(self, items: Iterator[dict], pool: WorkerPool | None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Worker items -> (images, labels, ids) on the device. uint8 crosses from the workers (4x fewer bytes
        than float32); the target device normalises. Batches handed out are copies (or the normalised result),
        never a slot a worker will refill."""
        this_pass = pool.passes if pool is not None else 0
        try:
            yield from self._batches(items, pool)
        except Exception:
            if pool is not None and pool.passes == this_pass:  # not a stale pass's error: the new one reads on
                pool.close()
                if self._pool is pool:
                    self._pool = None  # the next pass forks fresh workers
            raise

    def _batches(self, items: Iterator[dict], pool: WorkerPool | None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for item in map(raise_carried, items):  # a worker's KdpipeError is raised here as itself (one line)
            self._log.skipped.extend(map(tuple, item["skipped"]))  # a worker's pairs come back as lists
            x = item["images"] if pool is None else pool.image(item)
            labels, ids = host_to_device(item["labels"], self.device), host_to_device(item["ids"], self.device)
            if self.device.type == "cuda":  # pinned and without blocking; pin_memory() copies out of the slot
                x = host_to_device(x, self.device)
                yield (normalize_nhwc(x, self.dtype) if self.normalize else x.permute(0, 3, 1, 2)), labels, ids
            elif self.normalize:
                yield normalize_nhwc(x, self.dtype), labels, ids  # NHWC memory is NCHW channels_last: a view
            else:
                yield (torch.from_numpy(np.array(x.numpy())) if pool is not None else x).permute(0, 3, 1, 2), \
                    labels, ids

    def _read_chunk(self, chunk: np.ndarray) -> tuple[list[torch.Tensor], list[int]]:
        """Encoded bytes of a batch (runs on a reader thread: pread releases the GIL)."""
        datas, keep = [], []
        for sid in chunk.tolist():
            try:
                datas.append(torch.frombuffer(bytearray(self.index.read(sid)), dtype=torch.uint8))
                keep.append(sid)
            except CorruptSampleError as e:
                self._log.record(e, sid)
            except OSError as e:
                self._log.bad(self.index, sid, e)
        return datas, keep

    def _decode_on_device(self, datas: list[torch.Tensor], keep: list[int]) -> tuple[list[torch.Tensor], np.ndarray]:
        """One batched decode on the device; on failure, image by image to name (or skip) the bad one."""
        if self.hw_decoder is not None:  # per image None where neither nvImageCodec decoder could decode it
            imgs, ok = [], []
            for sid, img in zip(keep, self.hw_decoder([d.numpy().tobytes() for d in datas])):
                if img is None:
                    self._log.bad(self.index, sid, "not a decodable JPEG (nvImageCodec, hardware and CUDA decoders)")
                else:
                    imgs.append(img)
                    ok.append(sid)
        else:
            try:
                imgs, ok = (decode(datas, self.device) if datas else []), list(keep)
            except RuntimeError:
                imgs, ok = [], []
                for sid, data in zip(keep, datas):
                    try:
                        imgs.append(decode(data, self.device))
                        ok.append(sid)
                    except RuntimeError as e:
                        self._log.bad(self.index, sid, e)
        good = [(img, sid) for img, sid in zip(imgs, ok) if self._size_ok(img, sid)]
        return [g[0] for g in good], np.asarray([g[1] for g in good], dtype=np.int64)

    def _size_ok(self, img: torch.Tensor, sid: int) -> bool:
        why = size_mismatch((self.index.heights[sid], self.index.widths[sid]), img.shape[1:])
        if why is not None:
            self._log.bad(self.index, sid, why)
        return why is None

    def _iter_device(self, chunks: list[np.ndarray], aug_epoch: int):
        """Decode and augment on the device (CUDA), batch by batch; a thread reads the next batch's bytes."""
        idx, s = self.index, self.spec.image_size
        with ThreadPoolExecutor(1, thread_name_prefix="kdpipe-read") as pool:
            pending = pool.submit(self._read_chunk, chunks[0]) if chunks else None
            for k in range(len(chunks)):
                datas, keep = pending.result()
                pending = pool.submit(self._read_chunk, chunks[k + 1]) if k + 1 < len(chunks) else None
                imgs, ids = self._decode_on_device(datas, keep)
                p = sample_params(self.spec, self.seed, aug_epoch, ids, idx.heights[ids], idx.widths[ids]) \
                    if self.train else None
                x = augment_decoded(imgs, p, self.spec) if len(ids) else \
                    torch.empty((0, 3, s, s), dtype=torch.uint8, device=self.device)
                if self.normalize:
                    x = normalize_images(x, self.dtype)
                labels = torch.from_numpy(idx.labels[ids].astype(np.int64))
                yield x, host_to_device(labels, self.device), host_to_device(torch.from_numpy(ids), self.device)
