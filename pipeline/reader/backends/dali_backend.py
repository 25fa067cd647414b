"""DALI backend: sample ids -> decoded, augmented batches, from replayable params.

The view of a sample is computed outside DALI by `pipeline.core.augment.sample_params` (a pure function of
spec, seed, epoch, id, h, w) and fed in with the encoded bytes through `fn.external_source`, in exactly
the order the loader asks for; DALI's own random operators are never used, so a sample looks the same
whatever the batch size, order or backend. The graph (train):

    bytes, crop box ─▶ decoders.image_slice (ROI decode) ─▶ resize S×S (antialias)
        ─▶ brightness ─▶ contrast about the mean grey ─▶ saturation (docs/loader.md, uint8 between steps)
        ─▶ crop_mirror_normalize (per-sample flip; uint8 or (x - mean) / std) ─▶ HWC ─▶ NCHW channels_last

Validation: full decode, then one resize of the centre-crop ROI (shorter side -> val_resize, centre crop
image_size, the same sampling as torchvision's Resize + CenterCrop). On a CUDA device the decoder runs
"mixed" (nvJPEG) and the rest on the GPU; otherwise DALI's CPU-only mode (device_id=None).
DALI is imported lazily: importing this module never needs it.
"""
from __future__ import annotations

import contextlib
import os
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
import torch

from pipeline.core.augment import AugSpec, sample_params, val_geometry
from pipeline.core.batch import IMAGENET_MEAN_255, IMAGENET_STD_255, host_to_device
from pipeline.core.device import check_dtype, resolve_device
from pipeline.core.errors import CorruptSampleError
from pipeline.reader.backends.base import GREY, SkipLog, saturation_matrices

if TYPE_CHECKING:
    from pipeline.reader.index import ShardIndex

__all__ = ["DaliBackend", "import_dali", "saturation_matrices", "val_rois", "colour_steps"]

INSTALL_HINT = "the DALI backend needs NVIDIA DALI: pip install -e '.[dali]'"
PREFETCH = 2  # batches DALI works on ahead of the consumer


def import_dali() -> Any:
    """nvidia.dali, or an ImportError that says how to install it."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return nvidia.dali


# ---- pure helpers (numpy; testable without DALI) ----

def colour_steps(spec: AugSpec) -> tuple[str, ...]:
    """The colour steps a spec can change; a factor fixed at 1.0 needs no operator (and no time)."""
    return tuple(name for name in ("brightness", "contrast", "saturation") if getattr(spec, name) > 0)


def val_rois(spec: AugSpec, heights: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validation view as a resize ROI in source pixels: (start, end) rows of (y, x), float32.

    Resizing the ROI that the centre crop covers to S×S samples exactly the pixels that
    Resize(val_resize) + CenterCrop(S) keep (same scale, same origin), without resizing the rest.
    """
    start = np.zeros((len(heights), 2), np.float32)
    end = np.zeros((len(heights), 2), np.float32)
    for i, (h, w) in enumerate(zip(np.asarray(heights).tolist(), np.asarray(widths).tolist())):
        rh, rw, (top, left, ch, cw) = val_geometry(spec, h, w)
        start[i] = (top * h / rh, left * w / rw)
        end[i] = ((top + ch) * h / rh, (left + cw) * w / rw)
    return start, end


def dali_reason(err: BaseException) -> str:
    """The informative line of a DALI pipeline error (the text after "encountered:")."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for k, ln in enumerate(lines):
        if ln.startswith("encountered:") and k + 1 < len(lines):
            return lines[k + 1]
    return lines[-1] if lines else type(err).__name__


@dataclass(frozen=True)
class _Feed:
    """One batch ready for the graph: ids in order and one list of per-sample arrays per input."""

    ids: np.ndarray
    columns: tuple[list[np.ndarray], ...]
    chunk: int = 0  # which batch of the iteration it is (batches whose every sample was dropped never reach DALI)

    def take(self, keep: np.ndarray) -> "_Feed":
        idx = np.flatnonzero(keep)
        return _Feed(self.ids[idx], tuple([col[i] for i in idx] for col in self.columns), self.chunk)


_TORCH_TO_DALI = {torch.uint8: "UINT8", torch.float16: "FLOAT16", torch.float32: "FLOAT", torch.bfloat16: "FLOAT"}


def _graph(pipe: Any, source: Callable[[], tuple], *, train: bool, colour: tuple[str, ...], gpu: bool,
           size: int, normalize: bool, out_dtype: str, blend_contrast: bool) -> None:
    """Define the graph on `pipe`: external source of (bytes, params) -> HWC images.

    Colour follows docs/loader.md (definition v1) with uint8 intermediates (each step rounds and clamps):
    y1 = b*x; m = mean grey of y1; y2 = c*y1 + (1-c)*m; y3 = s*y2 + (1-s)*grey(y2).
    blend_contrast: compute y2 with arithmetic operators instead of brightness_contrast (needed on the
    GPU, where m is a GPU value and argument inputs must live on the CPU).
    """
    from nvidia.dali import fn, types

    f32, u8 = types.FLOAT, types.UINT8
    # On the GPU, nvJPEG splits a batch between the hardware decoder and the CUDA one by position
    # (hw_decoder_load); the two may round differently, so a sample's pixels would depend on its batch.
    # All-hardware keeps them a function of the sample (images it cannot take fall back per image).
    decoder = {"device": "mixed", "hw_decoder_load": 1.0} if gpu else {"device": "cpu"}
    if train:
        names = ("data", "anchor", "shape", "mirror") + colour
        dtypes = [u8, f32, f32, types.INT32] + [f32] * len(colour)
        ndims = [1, 1, 1, 0] + [2 if c == "saturation" else 0 for c in colour]
        inp = dict(zip(names, fn.external_source(source=source, num_outputs=len(names), batch=True,
                                                 dtype=dtypes, ndim=ndims)))
        # anchor = (left, top), shape = (width, height): absolute source pixels ("WH" order).
        img = fn.decoders.image_slice(inp["data"], inp["anchor"], inp["shape"], normalized_anchor=False,
                                      normalized_shape=False, output_type=types.RGB, **decoder)
        img = fn.resize(img, size=[size, size], antialias=True)
        if "brightness" in inp:
            img = fn.brightness_contrast(img, brightness=inp["brightness"])
        if "contrast" in inp:
            mean = fn.reductions.mean(img, axes=[0, 1], dtype=f32)
            grey = mean[0] * GREY[0] + mean[1] * GREY[1] + mean[2] * GREY[2]
            if blend_contrast:
                c = inp["contrast"].gpu() if gpu else inp["contrast"]
                img = fn.cast(img * c + (1.0 - c) * grey, dtype=u8)  # rounds half away from 0, clamps
            else:
                img = fn.brightness_contrast(img, contrast=inp["contrast"], contrast_center=grey)
        if "saturation" in inp:
            img = fn.coord_transform(img, M=inp["saturation"], dtype=u8)  # rounds and clamps
        mirror = inp["mirror"]
    else:
        data, roi_start, roi_end = fn.external_source(
            source=source, num_outputs=3, batch=True, dtype=[u8, f32, f32], ndim=[1, 1, 1])
        img = fn.decoders.image(data, output_type=types.RGB, **decoder)
        img = fn.resize(img, size=[size, size], roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                        antialias=True)
        mirror = 0
    if normalize:
        out = fn.crop_mirror_normalize(img, mirror=mirror, mean=list(IMAGENET_MEAN_255),
                                       std=list(IMAGENET_STD_255), dtype=getattr(types, out_dtype),
                                       output_layout="HWC")
    else:
        out = fn.crop_mirror_normalize(img, mirror=mirror, dtype=u8, output_layout="HWC")
    pipe.set_outputs(out)


class _Stream:
    """The feeding state of one pipeline: batches prepared but not handed over, and handed over but
    not yet taken back. DALI calls `source` once per iteration; outputs come back in the same order."""

    def __init__(self) -> None:
        self.pending: deque[_Feed] = deque()
        self.inflight: deque[_Feed] = deque()

    def source(self) -> tuple:
        if not self.pending:
            raise StopIteration
        feed = self.pending.popleft()
        self.inflight.append(feed)
        return feed.columns


class DaliBackend:
    """Turns sample ids into (images NCHW channels_last, labels int64, ids int64) with a DALI graph.

    One pipeline per batch size is built on first use (a few ms) and reused across epochs; a smaller
    last batch is fed as a variable-size batch. Decode failures raise CorruptSampleError naming the
    shard and sample id; with skip_corrupt=True such samples are dropped and listed in `.skipped`
    as (id, reason). One pipeline serves one iteration at a time; concurrent iterations get their own.
    """

    name = "dali"

    def __init__(self, index: ShardIndex, *, spec: AugSpec, seed: int, train: bool, device: torch.device,
                 normalize: bool = True, dtype: torch.dtype = torch.float32, num_workers: int | None = None,
                 skip_corrupt: bool = False):
        import_dali()
        self.index, self.spec, self.seed, self.train = index, spec, int(seed), bool(train)
        self.device = resolve_device(device, flag="device")
        self.gpu = self.device.type == "cuda"
        self.normalize, self.dtype = bool(normalize), (check_dtype(dtype) if normalize else torch.uint8)
        self.num_threads = max(1, int(num_workers) if num_workers else (os.cpu_count() or 1))
        self.skip_corrupt = bool(skip_corrupt)
        self._log = SkipLog(self.skip_corrupt)
        self.colour = colour_steps(spec) if self.train else ()
        self.blend_contrast = self.gpu  # the GPU graph's contrast step; settable on the CPU to test it
        self.exec_dynamic: bool | None = None  # DALI's executor (None: its default, dynamic in DALI 2.x)
        self._idle: dict[int, tuple[Any, _Stream]] = {}  # batch size -> a built pipeline not in use

    # ---- public
    @property
    def skipped(self) -> list[tuple[int, str]]:
        """(sample id, reason) of every sample dropped so far (skip_corrupt=True)."""
        return self._log.skipped

    def iter_batches(self, ids: np.ndarray, aug_epoch: int, batch_size: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches of exactly `ids`, in order (minus skipped corrupt samples), views of `aug_epoch`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        count = -(-len(ids) // batch_size)
        chunks = iter(enumerate(ids[i:i + batch_size] for i in range(0, len(ids), batch_size)))
        next_chunk = 0  # batches come out in order; a gap is a batch whose every sample was dropped
        # Each iteration owns its pipeline; it goes back to the pool only after a clean end.
        pipe, stream = self._idle.pop(batch_size, None) or self._new_stream(batch_size)
        finished = False
        try:
            self._top_up(stream, chunks, aug_epoch)
            pipe.schedule_run()  # a fresh (or reset) pipeline prefetches PREFETCH batches
            while True:
                try:
                    (out,) = pipe.outputs()
                except StopIteration:  # the source ran dry after the last batch
                    break
                except RuntimeError as err:  # the pipeline is dead after a failure: name the sample, rebuild
                    self._recover(stream, err)
                    pipe = self._build(batch_size, stream.source)
                    self._top_up(stream, chunks, aug_epoch)
                    pipe.schedule_run()
                    continue
                feed = stream.inflight.popleft()
                batch = self._to_torch(out, feed.ids, shared=bool(pipe.exec_dynamic))
                self._top_up(stream, chunks, aug_epoch)
                pipe.schedule_run()  # DALI works on the next batch while the consumer uses this one
                yield from (self._empty_batch() for _ in range(next_chunk, feed.chunk))
                next_chunk = feed.chunk + 1
                yield batch
            yield from (self._empty_batch() for _ in range(next_chunk, count))  # as the torch backend does
            finished = True
        finally:
            if finished:
                pipe.reset()
                self._idle[batch_size] = (pipe, stream)

    def _empty_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch whose every sample was dropped (skip_corrupt): empty, so the batch count is len()'s."""
        s, none = self.spec.image_size, torch.empty(0, dtype=torch.int64, device=self.device)
        images = torch.empty((0, s, s, 3), dtype=self.dtype, device=self.device).permute(0, 3, 1, 2)
        return images, none, none.clone()

    def _new_stream(self, batch_size: int) -> tuple[Any, _Stream]:
        stream = _Stream()
        return self._build(batch_size, stream.source), stream

    # ---- feeding
    def _top_up(self, stream: _Stream, chunks: Iterator[np.ndarray], aug_epoch: int) -> None:
        """Keep PREFETCH batches prepared, so DALI never runs dry before the real end."""
        while len(stream.pending) < PREFETCH:
            k, chunk = next(chunks, (None, None))
            if chunk is None:
                return
            feed = replace(self._prepare(chunk, aug_epoch), chunk=k)
            if len(feed.ids):
                stream.pending.append(feed)

    def _prepare(self, ids: np.ndarray, aug_epoch: int) -> _Feed:
        """Bytes (read in the main process; unreadable samples raise or are skipped) and per-sample params."""
        blobs, keep = [], np.ones(len(ids), bool)
        for j, i in enumerate(ids.tolist()):
            try:
                blobs.append(np.frombuffer(self.index.read(i), dtype=np.uint8))
            except CorruptSampleError as e:  # the index's own check named it already
                self._log.record(e, i)
                keep[j] = False
            except (OSError, ValueError) as e:
                self._corrupt(i, f"cannot read: {e}")
                keep[j] = False
        ids = ids[keep]
        hs, ws = self.index.heights[ids], self.index.widths[ids]
        if self.train:
            p = sample_params(self.spec, self.seed, aug_epoch, ids, hs, ws)
            anchor = np.stack([p.left, p.top], 1).astype(np.float32)
            shape = np.stack([p.width, p.height], 1).astype(np.float32)
            factors = {"brightness": p.brightness, "contrast": p.contrast,
                       "saturation": saturation_matrices(p.saturation)}
            cols = (blobs, list(anchor), list(shape), list(p.flip.astype(np.int32))) + \
                tuple(list(factors[name].astype(np.float32)) for name in self.colour)
        else:
            start, end = val_rois(self.spec, hs, ws)
            cols = (blobs, list(start), list(end))
        return _Feed(ids, cols)

    def _corrupt(self, sample_id: int, why: str) -> None:
        self._log.bad(self.index, sample_id, why)

    def _recover(self, stream: _Stream, err: RuntimeError) -> None:
        """After a failed iteration: decode the in-flight samples one by one to name the bad ones,
        then (skip_corrupt) queue everything not yet delivered again, without them, in order."""
        suspects = list(stream.inflight)
        feeds = suspects + list(stream.pending)
        stream.inflight.clear(), stream.pending.clear()
        bad = {i: why for i, why in self._probe(suspects).items() if why is not None}
        if not bad:
            raise RuntimeError(f"DALI failed on a batch of {self.index.shard_dir} ({self.index.split}) "
                               f"but every sample decodes alone: {err}") from err
        for i in sorted(bad):
            self._corrupt(i, f"DALI could not decode it: {bad[i]}")
        for f in feeds:  # only reached with skip_corrupt: replay the rest in order
            kept = f.take(~np.isin(f.ids, list(bad)))
            if len(kept.ids):
                stream.pending.append(kept)

    def _probe(self, feeds: list[_Feed]) -> dict[int, str | None]:
        """Each sample of `feeds` through the graph alone: None if accepted, else DALI's reason.

        One batch-size-1 pipeline, rebuilt only after a failure (a failed pipeline is dead)."""
        reasons: dict[int, str | None] = {}
        probe, pipe = _Stream(), None
        for f in feeds:
            for j, sample_id in enumerate(f.ids.tolist()):
                pipe = pipe or self._build(1, probe.source, prefetch=1)
                probe.pending.append(f.take(np.arange(len(f.ids)) == j))
                try:
                    pipe.run()
                    reasons[sample_id] = None
                except RuntimeError as e:
                    reasons[sample_id], pipe = dali_reason(e), None
                probe.pending.clear(), probe.inflight.clear()
        return reasons

    # ---- DALI
    def _build(self, batch_size: int, source: Callable[[], tuple], prefetch: int = PREFETCH) -> Any:
        from nvidia.dali.pipeline import Pipeline

        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if self.gpu else None
        pipe = Pipeline(batch_size=batch_size, num_threads=self.num_threads, device_id=device_id,
                        prefetch_queue_depth=prefetch, exec_dynamic=self.exec_dynamic)
        with pipe:
            _graph(pipe, lambda: source(), train=self.train, colour=self.colour, gpu=self.gpu,
                   size=self.spec.image_size, normalize=self.normalize, out_dtype=_TORCH_TO_DALI[self.dtype],
                   blend_contrast=self.blend_contrast)
        pipe.build()
        return pipe

    def _to_torch(self, out: Any, ids: np.ndarray, shared: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DALI's HWC batch as a torch tensor viewed as NCHW (channels_last memory), plus labels and ids.

        shared: DALI's dynamic executor gives each iteration fresh, reference-counted output memory, so
        torch can take it over through DLPack without a copy (as DALI's own pytorch iterator does).
        Otherwise DALI reuses its buffers and the batch is copied out.
        """
        dense = out.as_tensor()
        if shared:
            with torch.cuda.device(self.device) if self.gpu else contextlib.nullcontext():
                hwc = torch.from_dlpack(dense)
        else:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            raw_dtype = torch.float32 if self.dtype == torch.bfloat16 else self.dtype
            hwc = torch.empty(dense.shape(), dtype=raw_dtype, device=self.device)
            feed_ndarray(dense, hwc, cuda_stream=torch.cuda.current_stream(self.device) if self.gpu else None)
        images = hwc.permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels_last, no copy
        if self.dtype == torch.bfloat16:
            images = images.to(torch.bfloat16)  # DALI has no bfloat16; keeps the channels_last strides
        labels = host_to_device(torch.from_numpy(self.index.labels[ids].astype(np.int64)), self.device)
        return images, labels, host_to_device(torch.from_numpy(ids.copy()), self.device)
