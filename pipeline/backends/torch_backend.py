"""Torch backend: sample ids -> augmented batches with torchvision's decoder, no DALI needed.

CPU (any device without CUDA): DataLoader worker processes each build whole batches — libjpeg-turbo
decode (`torchvision.io.decode_jpeg`), crop as a view, uint8 antialiased resize to S×S
(`interpolate(antialias=True)` on channels_last uint8, the fast path), colour with one lookup table
(brightness, contrast) and one 3×3 matrix (saturation) in PIL's C code, flip — and send one uint8
NHWC tensor per batch, written straight into shared memory; the main process only normalises (on the
target device). Why not colour as batched float32 torch ops: on this 2-core machine those took ~2.7 ms
an image (several full passes over 64x224x224x3 floats) against ~0.3-0.5 ms for the LUT + matrix.
CUDA: `decode_jpeg(list, device="cuda")` decodes a batch at once on the GPU; crop, resize and colour
run there as torch ops (`augment_decoded`, which the CPU tests also exercise).
The pixel definition all backends follow is in docs/loader.md.
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io as tio
from PIL import Image

from ..augment import AugParams, AugSpec, sample_params, val_geometry
from ..errors import CorruptSampleError
from ..batch import IMAGENET_MEAN_255, IMAGENET_STD_255, host_to_device, normalize_images

if TYPE_CHECKING:
    from ..index import ShardIndex

# torchvision 0.29 deprecates its image codecs in favour of torchcodec, warning on every call; they
# remain the fastest libjpeg-turbo / nvJPEG path installed here, so `decode` silences that warning.
_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


def decode(data, device: torch.device | str = "cpu"):
    """torchvision.io.decode_jpeg to RGB (one tensor or a list, decoded as one batch on `device`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CODEC_DEPRECATION, category=DeprecationWarning)
        return tio.decode_jpeg(data, mode=tio.ImageReadMode.RGB, device=device)


GREY = (0.299, 0.587, 0.114)  # luma weights of the colour definition (PIL's, torchvision's rounded)
_GREY = np.asarray(GREY, dtype=np.float64)
_LEVELS = np.arange(256, dtype=np.float64)


def sample_error(index: ShardIndex, sample_id: int, reason: object) -> CorruptSampleError:
    """The error for one bad sample, naming where it lives so the user can find and fix it (an error that
    already does, like ShardIndex.read's crc32 failure, is kept as it is)."""
    if isinstance(reason, CorruptSampleError):
        return reason
    try:
        where = str(index.shard_path(sample_id))
    except (IndexError, KeyError) as e:
        where = f"(no shard: {e})"
    text = " ".join(str(reason).split())[:300]
    return CorruptSampleError(f"{index.split} sample {int(sample_id)} in shard {where}: {text} "
                              f"(--skip-corrupt, or skip_corrupt=True, drops such samples and counts them)")


def read_and_decode(index: ShardIndex, sample_id: int) -> torch.Tensor:
    """Bytes from the shard, decoded to RGB uint8 (3, H, W) (channels_last strides); clear errors."""
    try:
        data = index.read(sample_id)
        img = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except CorruptSampleError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise sample_error(index, sample_id, e) from e
    h, w = int(index.heights[sample_id]), int(index.widths[sample_id])
    if tuple(img.shape[1:]) != (h, w):  # crops are computed from the index's size: they must agree
        raise sample_error(index, sample_id, f"decoded {img.shape[1]}x{img.shape[2]} but the index says {h}x{w}")
    return img


def resize_uint8(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) uint8 -> (size) antialiased bilinear, uint8, channels_last (the AVX2 uint8 path)."""
    x = img.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def colour_lut(hist: np.ndarray, npix: int, b: float, c: float) -> np.ndarray:
    """Brightness then contrast as one uint8 table: y2 = clamp(c*clamp(b*x) + (1-c)*m), rounded.

    m, the mean grey of the brightened image, is exact: it comes from the per-channel histograms.
    """
    y1 = np.clip(b * _LEVELS, 0.0, 255.0)
    m = float(_GREY @ hist.reshape(3, 256) @ y1) / npix
    y2 = np.clip(c * y1 + (1.0 - c) * m, 0.0, 255.0)
    return np.floor(y2 + 0.5).astype(np.uint8)


def saturation_matrix(s: float) -> tuple[float, ...]:
    """PIL's RGB->RGB matrix (12 numbers, zero offsets) for y3 = s*y2 + (1-s)*grey(y2)."""
    k = 1.0 - s
    w = GREY
    return (s + k * w[0], k * w[1], k * w[2], 0.0,
            k * w[0], s + k * w[1], k * w[2], 0.0,
            k * w[0], k * w[1], s + k * w[2], 0.0)


def colour_hwc(hwc: np.ndarray, b: float, c: float, s: float) -> Image.Image:
    """The colour definition on one HWC uint8 image, in PIL's C code (clamps and rounds like the spec)."""
    im = Image.frombuffer("RGB", (hwc.shape[1], hwc.shape[0]), hwc, "raw", "RGB", 0, 1)
    if b == 1.0 and c == 1.0 and s == 1.0:
        return im
    lut = colour_lut(np.asarray(im.histogram(), dtype=np.float64), hwc.shape[0] * hwc.shape[1], b, c)
    im = _point(im, np.tile(lut, 3).tolist())
    return im if s == 1.0 else im.convert("RGB", saturation_matrix(s))


def _point(im: Image.Image, lut: list[int]) -> Image.Image:
    """im.point(lut) for an integer table, without Image.point's per-entry round() (~20 % of colour)."""
    try:
        return im._new(im.im.point(lut, None))
    except AttributeError:  # Pillow's internals moved: the public call
        return im.point(lut)


def train_view(img: torch.Tensor, p: AugParams, i: int, size: int, dst: np.ndarray | None = None) -> np.ndarray:
    """Row i of the params applied to a decoded image: (size, size, 3) uint8 HWC, written into `dst`
    (e.g. the batch's shared-memory slot: one copy, the flip folded into it) or a new array."""
    t, l, h, w = int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i])
    out = np.ascontiguousarray(resize_uint8(img[:, t:t + h, l:l + w], (size, size)).permute(1, 2, 0).numpy())
    im = colour_hwc(out, float(p.brightness[i]), float(p.contrast[i]), float(p.saturation[i]))
    arr = np.asarray(im)  # read-only view of PIL's buffer copy
    dst = np.empty((size, size, 3), np.uint8) if dst is None else dst
    dst[...] = arr[:, ::-1] if p.flip[i] else arr
    return dst


def val_view(img: torch.Tensor, spec: AugSpec) -> torch.Tensor:
    """Shorter side -> val_resize, centre crop image_size: (S, S, 3) uint8."""
    rh, rw, (t, l, h, w) = val_geometry(spec, int(img.shape[1]), int(img.shape[2]))
    return resize_uint8(img, (rh, rw))[:, t:t + h, l:l + w].permute(1, 2, 0)


def normalize_nhwc(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (u - 255 mean) / (255 std) as NCHW channels_last in dtype (float32 math).

    Scale and offset are pre-tiled to (H, W, 3): broadcasting a 3-vector over the innermost dimension
    runs ~3x slower on the CPU than this same-shape multiply-add."""
    scale, offset = _norm_pattern(tuple(x.shape[1:]), x.device)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if x.device.type == "cpu":
        # numpy: one thread, as fast as torch's one-thread kernels, and no intra-op pool spinning
        # on cores the worker processes need (measured: 2 torch threads here lowered throughput).
        o = out.numpy()
        np.multiply(x.numpy(), scale.numpy(), out=o)
        np.add(o, offset.numpy(), out=o)
    else:
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


class BatchBuilder(torch.utils.data.Dataset):
    """Item k = batch k of `chunks`, built whole in one worker: uint8 NHWC images written straight
    into shared memory, so the main process receives them without a copy."""

    def __init__(self, index: ShardIndex, spec: AugSpec, seed: int, aug_epoch: int, train: bool,
                 chunks: Sequence[np.ndarray], skip_corrupt: bool):
        self.index, self.spec, self.seed, self.aug_epoch = index, spec, seed, aug_epoch
        self.train, self.chunks, self.skip_corrupt = train, list(chunks), skip_corrupt

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> dict:
        ids = self.chunks[k]
        idx, s = self.index, self.spec.image_size
        p = sample_params(self.spec, self.seed, self.aug_epoch, ids, idx.heights[ids], idx.widths[ids]) \
            if self.train else None
        shape = (len(ids), s, s, 3)
        out = shared_uint8(shape) if torch.utils.data.get_worker_info() is not None else \
            torch.empty(shape, dtype=torch.uint8)
        out_np = out.numpy()
        keep: list[int] = []
        skipped: list[tuple[int, str]] = []
        for i, sid in enumerate(ids.tolist()):
            try:
                img = read_and_decode(idx, sid)
                try:
                    if self.train:
                        train_view(img, p, i, s, out_np[len(keep)])
                    else:
                        out[len(keep)] = val_view(img, self.spec)
                except (RuntimeError, ValueError) as e:
                    raise sample_error(idx, sid, e) from e
            except CorruptSampleError as e:
                if not self.skip_corrupt:
                    raise
                skipped.append((sid, str(e)))
                continue
            keep.append(i)
        sel = ids[np.asarray(keep, dtype=np.int64)]
        return {"images": out[:len(keep)], "ids": torch.from_numpy(sel),
                "labels": torch.from_numpy(idx.labels[sel].astype(np.int64)), "skipped": skipped}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one process per core; intra-op threads would fight over the same cores


def augment_decoded(imgs: Sequence[torch.Tensor], p: AugParams | None, spec: AugSpec) -> torch.Tensor:
    """Decoded (3, H, W) uint8 images (any device) -> uint8 (N, 3, S, S), all in torch ops.

    The GPU path. Same definition as the CPU path; colour stays in float32 (no rounding of y2).
    """
    s = spec.image_size
    views = []
    for i, img in enumerate(imgs):
        if p is None:
            rh, rw, (t, l, h, w) = val_geometry(spec, int(img.shape[1]), int(img.shape[2]))
            x = F.interpolate(img.unsqueeze(0).float(), size=(rh, rw), mode="bilinear", antialias=True,
                              align_corners=False)[:, :, t:t + h, l:l + w]
        else:
            t, l, h, w = int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i])
            x = F.interpolate(img[:, t:t + h, l:l + w].unsqueeze(0).float(), size=(s, s), mode="bilinear",
                              antialias=True, align_corners=False)
        views.append(x)
    x = torch.cat(views).clamp_(0, 255).round_()  # the resize output is uint8 in the definition
    if p is not None:
        dev = x.device
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
    """The torch backend (constructor and `iter_batches` as every backend: see pipeline/loader.py)."""

    name = "torch"

    def __init__(self, index: ShardIndex, *, spec: AugSpec, seed: int, train: bool, device: torch.device,
                 normalize: bool, dtype: torch.dtype, num_workers: int, skip_corrupt: bool):
        self.index, self.spec, self.seed, self.train = index, spec, seed, train
        self.device, self.normalize, self.dtype = torch.device(device), normalize, dtype
        self.num_workers, self.skip_corrupt = num_workers, skip_corrupt
        self.skipped: list[tuple[int, str]] = []  # (sample id, reason) of every dropped sample
        # CUDA: batched nvJPEG decode + torch ops on the GPU, in this process. Elsewhere CPU workers.
        # (Tests set it on the CPU to run the same code with torchvision's CPU decoder.)
        self.device_decode = self.device.type == "cuda"

    def iter_batches(self, ids: np.ndarray, aug_epoch: int, batch_size: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(images, labels, ids) for `ids` in exactly this order, `batch_size` at a time."""
        ids = np.asarray(ids, dtype=np.int64)
        chunks = [ids[i:i + batch_size] for i in range(0, len(ids), batch_size)]
        if self.device_decode:
            yield from self._iter_device(chunks, aug_epoch)
            return
        # uint8 crosses from the workers (4x fewer bytes than float32, and fresh float32 shared memory
        # costs more in page faults than normalising here); the target device normalises.
        builder = BatchBuilder(self.index, self.spec, self.seed, aug_epoch, self.train, chunks, self.skip_corrupt)
        workers = min(self.num_workers, len(chunks))
        dl = torch.utils.data.DataLoader(builder, batch_size=None, shuffle=False, num_workers=workers,
                                         worker_init_fn=_worker_init if workers else None,
                                         prefetch_factor=4 if workers else None)
        for item in dl:
            self.skipped.extend(item["skipped"])
            x = item["images"].to(self.device, non_blocking=True)
            # NHWC memory is NCHW channels_last: permute is a view
            x = normalize_nhwc(x, self.dtype) if self.normalize else x.permute(0, 3, 1, 2)
            yield x, host_to_device(item["labels"], self.device), host_to_device(item["ids"], self.device)

    def _read_chunk(self, chunk: np.ndarray) -> tuple[list[torch.Tensor], list[int]]:
        """Encoded bytes of a batch (runs on a reader thread: pread releases the GIL)."""
        datas, keep = [], []
        for sid in chunk.tolist():
            try:
                datas.append(torch.frombuffer(bytearray(self.index.read(sid)), dtype=torch.uint8))
                keep.append(sid)
            except (OSError, CorruptSampleError) as e:
                self._bad(sid, e)
        return datas, keep

    def _decode_on_device(self, datas: list[torch.Tensor], keep: list[int]) -> tuple[list[torch.Tensor], np.ndarray]:
        """One batched decode on the device; on failure, image by image to name (or skip) the bad one."""
        try:
            imgs, ok = (decode(datas, self.device) if datas else []), list(keep)
        except RuntimeError:
            imgs, ok = [], []
            for sid, data in zip(keep, datas):
                try:
                    imgs.append(decode(data, self.device))
                    ok.append(sid)
                except RuntimeError as e:
                    self._bad(sid, e)
        good = [(img, sid) for img, sid in zip(imgs, ok) if self._size_ok(img, sid)]
        return [g[0] for g in good], np.asarray([g[1] for g in good], dtype=np.int64)

    def _size_ok(self, img: torch.Tensor, sid: int) -> bool:
        h, w = int(self.index.heights[sid]), int(self.index.widths[sid])
        if tuple(img.shape[1:]) == (h, w):
            return True
        self._bad(sid, f"decoded {img.shape[1]}x{img.shape[2]} but the index says {h}x{w}")
        return False

    def _bad(self, sid: int, reason: object) -> None:
        err = sample_error(self.index, sid, reason)
        if not self.skip_corrupt:
            raise err
        self.skipped.append((sid, str(err)))

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
