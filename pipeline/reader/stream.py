"""Streaming a shard directory from a URL: the same views as random access, read sequentially.

What is fetched once: manifest.json and `<split>.index.npy` (`pipeline.core.remote.RemoteIndex`). What is
streamed: the tars, each read front to back through webdataset's tar iterator (`read_segment`), starting at the
first sample a rank needs (the index gives its byte offset) and stopping after the last one.

Order (`stream_plan`, pure): per epoch the shards are permuted with (seed, epoch) (train; val keeps shard
order); the samples of that shard sequence are cut into world_size contiguous ranges, rank r taking range r (so a
rank reads whole shards except at most two partial ones at its ends, and every sample belongs to exactly one
rank); within its range a rank's samples pass through a shuffle buffer of `buffer` samples seeded by (seed,
epoch, rank), webdataset's algorithm. Training pads each rank to ceil(N / world_size) samples by repeating its
last sample (at most one), so all ranks run the same number of steps. The order is computed from the manifest
alone, so it is known before any byte arrives: resume skips exactly the batches already done.

Pixels: each sample is decoded and augmented by the torch backend's own code (`BatchBuilder`) from its id, so a
sample's view is the same as on the random-access path; only the order differs.
"""
from __future__ import annotations

import os
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.core.errors import CorruptSampleError, RemoteReadError, ShardFormatError, one_line
from pipeline.reader.prefetch import put_until_stopped
from pipeline.reader.index import RemoteIndex, jpeg_crc_problem
from pipeline.core.remote import RETRIES, RetryingStream

DEFAULT_BUFFER = 1000  # samples held for the shuffle (about 110 MB of ImageNet JPEGs)
TAR_BLOCK = 512
Segment = tuple[int, int, int]  # (shard number, first id, end id): ids [first, end) of one shard, read in order


# ---------------------------------------------------------------- order (pure)

@dataclass(frozen=True)
class StreamPlan:
    segments: list[Segment]  # what this rank reads, in order
    order: np.ndarray  # int64 ids in the order they are yielded


def rank_span(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Positions [a, b) of rank's contiguous share of n samples (sizes differ by at most one)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def stream_count(n: int, rank: int, world_size: int, pad: bool) -> int:
    """Samples a rank yields per epoch: ceil(n / world_size) when padded, else its share."""
    a, b = rank_span(n, rank, world_size)
    return -(-n // world_size) if pad else b - a


def buffer_shuffle(ids: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """webdataset's shuffle buffer as a pure function: hold `size` samples; as each new one arrives, emit a random
    held one and keep the new one in its place; at the end emit the rest in random order. At most size + 1
    samples are ever held, and the output depends only on the ids and the generator."""
    n = len(ids)
    size = min(size, n)
    if size <= 1:
        return np.asarray(ids, dtype=np.int64).copy()
    buf = [int(x) for x in ids[:size]]
    picks = (rng.random(n - size) * size).astype(np.int64).tolist()
    out = np.empty(n, dtype=np.int64)
    for j, x in enumerate(ids[size:].tolist()):
        p = picks[j]
        out[j], buf[p] = buf[p], x
    out[n - size:] = np.asarray(buf, dtype=np.int64)[rng.permutation(size)]
    return out


def stream_plan(first_ids: list[int], counts: list[int], seed: int, epoch: int, rank: int = 0,
                world_size: int = 1, *, shuffle: bool = True, pad: bool = True,
                buffer: int = DEFAULT_BUFFER) -> StreamPlan:
    """What rank `rank` reads and yields in `epoch` (see the module docstring)."""
    n = int(sum(counts))
    shard_seq = np.random.default_rng([seed, epoch, 0x57AEA3]).permutation(len(counts)) if shuffle \
        else np.arange(len(counts))
    a, b = rank_span(n, rank, world_size)
    segments, pos = [], 0
    for k in shard_seq.tolist():
        lo, hi = max(a, pos), min(b, pos + counts[k])
        if lo < hi:
            segments.append((k, first_ids[k] + lo - pos, first_ids[k] + hi - pos))
        pos += counts[k]
    arrival = np.concatenate([np.arange(lo, hi, dtype=np.int64) for _, lo, hi in segments]) if segments \
        else np.empty(0, np.int64)
    order = buffer_shuffle(arrival, buffer, np.random.default_rng([seed, epoch, rank, 0xB0FFE2])) if shuffle \
        else arrival
    target = stream_count(n, rank, world_size, pad)
    if len(order) < target:  # pad: repeat the last sample (or, for a rank with no share, the epoch's first)
        if not len(order):
            k = int(shard_seq[0])
            segments, order = [(k, first_ids[k], first_ids[k] + 1)], np.asarray([first_ids[k]], np.int64)
        order = np.concatenate([order, np.repeat(order[-1:], target - len(order))])
    return StreamPlan(segments, order)


def needed_segments(shard_of: np.ndarray, ids: np.ndarray, segments: list[Segment] | None) -> list[Segment]:
    """The segments to read for `ids`, each narrowed to the ids it must deliver; without a plan, every shard
    that holds some id, in order of first appearance in `ids`."""
    want = np.unique(ids)
    if segments is None:
        shards = shard_of[ids]
        _, first = np.unique(shards, return_index=True)
        seq = shards[np.sort(first)].tolist()
        segments = [(k, int(want[shard_of[want] == k].min()), int(want[shard_of[want] == k].max()) + 1)
                    for k in seq]
    out = []
    for k, lo, hi in segments:
        inside = want[np.searchsorted(want, lo):np.searchsorted(want, hi)]
        if len(inside):
            out.append((k, int(inside[0]), int(inside[-1]) + 1))
    return out


# ---------------------------------------------------------------- reading

def read_segment(index: RemoteIndex, seg: Segment, retries: int = RETRIES) -> Iterator[tuple[int, bytes | None, str]]:
    """(id, JPEG bytes, "") for ids [first, end) of one shard in order, read sequentially from the first one's
    tar header on; (id, None, reason) for a sample whose bytes fail the index's size or crc32.
    A stream that cannot be read whole raises RemoteReadError; a tar that disagrees with the manifest,
    ShardFormatError. Never fewer samples than asked without an error."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    k, lo, hi = seg
    url, info = index.shard_url(k), index.shards[k]
    start = int(index.rows["offset"][lo]) - TAR_BLOCK  # the .jpg header: each sample's first member
    if start < 0 or start % TAR_BLOCK:
        raise ShardFormatError(f"{index.shard_dir}: index offset {start + TAR_BLOCK} of sample {lo} is not where a "
                               f"kdpipe sample starts in {info['name']}")
    errors: list[BaseException] = []

    def stop(exn: BaseException) -> bool:  # webdataset's handler: record the first error and stop iterating
        errors.append(exn)
        return False

    expected = lo
    with RetryingStream(url, info["bytes"], start, retries) as stream:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=stop,
                                  select_files=lambda name: name.endswith(".jpg"))
        for sample in group_by_keys(files, handler=stop):
            try:
                sid = int(sample["__key__"])
            except ValueError:
                sid = -1
            if sid != expected:
                raise ShardFormatError(f"{url}: expected sample {expected}, found {sample['__key__']!r}; the shard "
                                       f"and the index disagree (run kdpipe verify on the source)")
            yield (sid, *check_sample(index, sid, sample))
            expected += 1
            if expected >= hi:
                return
    if errors:
        err = errors[0]
        if isinstance(err, RemoteReadError):
            raise RemoteReadError(one_line(str(err.args[0]).split(" @ ")[0])) from None
        raise ShardFormatError(f"{url}: unreadable tar after sample {expected - 1} "
                               f"({type(err).__name__}: {one_line(str(err.args[0]).split(' @ ')[0], 200)})") from None
    raise RemoteReadError(f"{url}: the tar ended after sample {expected - 1}; the manifest says it holds samples "
                          f"up to {info['first_id'] + info['count'] - 1}")


def check_sample(index: RemoteIndex, sid: int, sample: dict) -> tuple[bytes | None, str]:
    """(bytes, "") when the JPEG has the size and crc32 the index records, else (None, reason)."""
    jpg = sample.get("jpg")
    if jpg is None:
        return None, "sample lacks its .jpg member"
    size, crc = int(index.rows["size"][sid]), int(index.rows["crc32"][sid])
    if len(jpg) != size:
        return None, f".jpg has {len(jpg)} bytes, the index says {size}"
    problem = jpeg_crc_problem(jpg, crc)
    return (None, problem) if problem else (jpg, "")


def ordered_samples(index: RemoteIndex, segments: list[Segment], order: np.ndarray,
                    retries: int = RETRIES) -> Iterator[tuple[int, bytes | None, str]]:
    """(id, bytes or None, reason) for every id of `order`, in that order, from the segments read in turn.
    Holds only samples that arrived before their turn (at most the shuffle buffer's)."""
    need = Counter(order.tolist())
    held: dict[int, tuple[bytes | None, str]] = {}
    pos, n = 0, len(order)
    for seg in segments:
        for sid, data, reason in read_segment(index, seg, retries):
            if need.get(sid):
                held[sid] = (data, reason)
            while pos < n and int(order[pos]) in held:
                x = int(order[pos])
                yield (x, *held[x])
                need[x] -= 1
                if not need[x]:
                    del held[x]
                pos += 1
    if pos < n:
        raise RuntimeError(f"the stream plan missed sample {int(order[pos])}: segments do not cover the order")


# ---------------------------------------------------------------- batches

class _BytesIndex:
    """What the torch backend's BatchBuilder reads from an index, for one batch whose bytes came by stream."""

    def __init__(self, index: RemoteIndex, ids: np.ndarray, blob: torch.Tensor, offsets: np.ndarray):
        self.index, self.blob, self.offsets = index, blob, offsets
        self.pos = {int(s): i for i, s in enumerate(ids.tolist())}
        self.split, self.heights, self.widths, self.labels = index.split, index.heights, index.widths, index.labels

    def read(self, sample_id: int) -> bytes:
        i = self.pos[int(sample_id)]
        return self.blob[int(self.offsets[i]):int(self.offsets[i + 1])].numpy().tobytes()

    def shard_path(self, sample_id: int) -> str:
        return self.index.shard_path(sample_id)


class _DecodeBatches(torch.utils.data.Dataset):
    """Item = (ids, blob, offsets, skipped) -> the torch backend's batch dict (uint8 NHWC, labels, ids)."""

    def __init__(self, index: RemoteIndex, spec: Any, seed: int, aug_epoch: int, train: bool, skip_corrupt: bool):
        self.index, self.spec, self.seed, self.aug_epoch = index, spec, seed, aug_epoch
        self.train, self.skip_corrupt = train, skip_corrupt

    def __getitem__(self, item: tuple) -> dict:
        from pipeline.reader.backends.torch_backend import BatchBuilder

        ids, blob, offsets, skipped = item
        view = _BytesIndex(self.index, ids, blob, offsets)
        out = BatchBuilder(view, self.spec, self.seed, self.aug_epoch, self.train, [ids], self.skip_corrupt)[0]
        out["skipped"] = skipped + out["skipped"]
        return out


def pack(chunk: np.ndarray, samples: Iterator[tuple[int, bytes | None, str]], split: str,
         skip_corrupt: bool) -> tuple:
    """The next len(chunk) samples as one item: kept ids, their bytes in one uint8 tensor, offsets, skipped."""
    keep, datas, skipped = [], [], []
    for want in chunk.tolist():
        sid, data, reason = next(samples)
        assert sid == want, (sid, want)
        if data is None:
            if not skip_corrupt:
                raise CorruptSampleError(f"{split} sample {sid} (streamed): {reason} "
                                         f"(pass skip_corrupt=True to drop such samples and count them)")
            skipped.append((sid, reason))
            continue
        keep.append(sid)
        datas.append(data)
    offsets = np.zeros(len(datas) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in datas], out=offsets[1:])
    blob = torch.empty(int(offsets[-1]), dtype=torch.uint8)
    view = blob.numpy()
    for d, a, b in zip(datas, offsets[:-1], offsets[1:]):
        view[a:b] = np.frombuffer(d, dtype=np.uint8)
    return np.asarray(keep, dtype=np.int64), blob, offsets, skipped


_END = object()


def _produce(q: queue.Queue, stop: threading.Event, items: Iterator[tuple]) -> None:
    """Reader thread: put items (then _END, or the exception that ended it) on q until told to stop."""

    def put(x: object) -> bool:
        return put_until_stopped(q, x, stop)

    try:
        for item in items:
            if not put(item):
                return
        put(_END)
    except BaseException as e:  # handed to the consumer, raised there
        put(e)


def _drain(q: queue.Queue, failed: list[BaseException]) -> Iterator[tuple]:
    """The reader's items until it ends; an exception it handed over ends the items and goes into `failed`
    (raised by the consumer once the batches in flight are out: a DataLoader whose sampler raises leaves its
    worker pipes to be closed twice)."""
    while True:
        item = q.get()
        if item is _END:
            return
        if isinstance(item, BaseException):
            failed.append(item)
            return
        yield item


class StreamBackend:
    """The torch backend's pixels for samples that arrive by stream (see pipeline/reader/loader.py for the interface).

    A reader thread streams and packs batches; worker processes decode and augment them (bytes travel in one
    shared-memory tensor per batch); this process normalises. `iter_batches` also takes the epoch plan's
    `segments`, so a rank reads exactly its shards in the planned order."""

    name = "torch"

    def __init__(self, index: RemoteIndex, *, spec: Any, seed: int, train: bool, device: torch.device,
                 normalize: bool, dtype: torch.dtype, num_workers: int, skip_corrupt: bool, retries: int = RETRIES):
        self.index, self.spec, self.seed, self.train = index, spec, seed, train
        self.device, self.normalize, self.dtype = torch.device(device), normalize, dtype
        self.num_workers, self.skip_corrupt, self.retries = num_workers, skip_corrupt, retries
        self.skipped: list[tuple[int, str]] = []
        self.queue_batches = 2 + 2 * num_workers  # packed batches waiting for a worker (memory bound)

    def iter_batches(self, ids: np.ndarray, aug_epoch: int, batch_size: int, segments: list[Segment] | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, ids) for `ids` in exactly this order, `batch_size` at a time."""
        from pipeline.reader.backends.base import CarryErrors, raise_carried
        from pipeline.reader.backends.torch_backend import normalize_nhwc, worker_init_for
        from pipeline.core.batch import host_to_device

        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        segs = needed_segments(self.index.rows["shard"], ids, segments)
        samples = ordered_samples(self.index, segs, ids, self.retries)
        chunks = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        items = (pack(c, samples, self.index.split, self.skip_corrupt) for c in chunks)
        q: queue.Queue = queue.Queue(maxsize=self.queue_batches)
        stop = threading.Event()
        decode = _DecodeBatches(self.index, self.spec, self.seed, aug_epoch, self.train, self.skip_corrupt)
        workers = min(self.num_workers, len(chunks))
        reader = threading.Thread(target=_produce, args=(q, stop, items), name="kdpipe-stream", daemon=True)
        failed: list[BaseException] = []
        try:
            if workers:  # the DataLoader forks its workers first, then pulls items (starting the reader)
                init = worker_init_for(os.getpid())  # workers die with the main process
                batches = map(raise_carried, torch.utils.data.DataLoader(  # a worker's KdpipeError, as itself
                    CarryErrors(decode), batch_size=None, sampler=_Started(reader, q, failed), num_workers=workers,
                    worker_init_fn=init, prefetch_factor=2))
            else:
                reader.start()
                batches = (decode[item] for item in _drain(q, failed))
            for out in batches:
                self.skipped.extend(map(tuple, out["skipped"]))  # a worker's pairs come back as lists
                x = out["images"].to(self.device, non_blocking=True)
                x = normalize_nhwc(x, self.dtype) if self.normalize else x.permute(0, 3, 1, 2)
                yield x, host_to_device(out["labels"], self.device), host_to_device(out["ids"], self.device)
            if failed:  # the stream broke: never a silently short epoch
                raise failed[0]
        finally:
            stop.set()
            while True:  # unblock a reader waiting to put
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            if reader.is_alive():
                reader.join(timeout=1.0)


class _Started:
    """The DataLoader's sampler: starts the reader thread on first use (after the workers are forked), then
    hands over its items in order."""

    def __init__(self, reader: threading.Thread, q: queue.Queue, failed: list[BaseException]):
        self.reader, self.q, self.failed = reader, q, failed

    def __iter__(self) -> Iterator[tuple]:
        if not self.reader.is_alive() and self.reader.ident is None:
            self.reader.start()
        return _drain(self.q, self.failed)
