"""The CPU pixel path of the torch backend: JPEG bytes -> one training or validation view, uint8 HWC.

Per training view: decode only the crop box when nvImageCodec is installed (libjpeg-turbo's ROI decode:
rows below the box are never decoded, columns outside it skip the IDCT), else torchvision's full
libjpeg-turbo decode and a crop view; uint8 antialiased resize (torch's AVX2 path); flip as a cheap
uint8 copy; colour in float32 numpy (a clip, one mat-vec for the mean grey, one 3x3 mat-mul), rounded
straight into the caller's slot. Each step was measured against the alternatives (docs/loader.md,
"Routes measured"). The pixel definition all backends follow is in docs/loader.md.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io as tio

from pipeline.core.augment import AugParams, AugSpec, val_geometry
from pipeline.reader.backends.base import GREY, saturation_matrices, size_mismatch

# torchvision 0.29 deprecates its image codecs in favour of torchcodec, warning on every call; they
# remain the fastest libjpeg-turbo / nvJPEG path installed here, so `decode` silences that warning.
_CODEC_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"
_GREY32 = np.asarray(GREY, dtype=np.float32)

Box = tuple[int, int, int, int]  # top, left, height, width in source pixels


def decode(data, device: torch.device | str = "cpu"):
    """torchvision.io.decode_jpeg to RGB (one tensor or a list, decoded as one batch on `device`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CODEC_DEPRECATION, category=DeprecationWarning)
        return tio.decode_jpeg(data, mode=tio.ImageReadMode.RGB, device=device)


# ---- ROI decode (nvImageCodec's CPU libjpeg-turbo backend, installed with DALI; optional)

_ROI: dict[str, object] = {}  # "pid" -> the process that made "decoder" (a decoder never crosses a fork)


def roi_decoder():
    """This process's nvImageCodec CPU decoder, or None when nvImageCodec is not installed."""
    if _ROI.get("pid") != os.getpid():
        _ROI.clear()
        _ROI["pid"] = os.getpid()
        try:
            from nvidia import nvimgcodec as nv
        except ImportError:
            _ROI["decoder"] = None
        else:
            _ROI["nv"] = nv
            _ROI["decoder"] = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
                                         backends=[nv.Backend(nv.CPU_ONLY)])
            # like torchvision's decode_jpeg: no EXIF rotation (the index's h, w are the stored ones), RGB
            _ROI["params"] = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.SRGB,
                                             allow_any_depth=False, sample_format=nv.I_RGB)
    return _ROI["decoder"]


def decode_region(data: bytes, expected: tuple[int, int], box: Box | None = None) -> torch.Tensor:
    """The box (or the whole image) of a JPEG as uint8 (3, h, w) with HWC memory (channels-last strides).

    Raises ValueError (a size other than the index's `expected`, or no image) or the decoder's RuntimeError."""
    dec = roi_decoder()
    if dec is None:
        img = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        if (why := size_mismatch(expected, img.shape[1:])) is not None:
            raise ValueError(why)
        return img if box is None else img[:, box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
    nv = _ROI["nv"]
    stream = nv.CodeStream(data)  # parses the headers only
    if (why := size_mismatch(expected, (stream.height, stream.width))) is not None:
        raise ValueError(why)
    if box is not None:
        t, l, h, w = box
        stream = stream.get_sub_code_stream(region=nv.Region(t, l, t + h, l + w))
    img = dec.decode(stream, params=_ROI["params"])
    if img is None:
        raise ValueError("not a decodable JPEG (libjpeg-turbo, through nvImageCodec)")
    return torch.from_numpy(np.asarray(img.cpu())).permute(2, 0, 1)  # a view of the decoder's buffer


# ---- geometry and colour


def resize_uint8(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) uint8 -> (size) antialiased bilinear, uint8, channels_last (the AVX2 uint8 path)."""
    x = img.unsqueeze(0).contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def colour_into(x: np.ndarray, b: float, c: float, s: float, dst: np.ndarray) -> np.ndarray:
    """The colour definition (docs/loader.md) on one HWC uint8 image, rounded into `dst` (same shape).

    float32 numpy, three passes that matter: y1 = clamp(b*x) as b*min(x, 255/b); m from one vec-mat;
    then contrast and saturation as one 3x3 mat-mul (exact when c <= 1: y2 needs no clamp then, and
    the saturation blend of values in [0, 255] stays in it before the final clamp). Numpy, not torch:
    torch's (N, 3) @ (3, 3) took ~0.4 ms here against numpy's ~0.07, and its float->uint8 copy 7x longer.
    """
    y = x.reshape(-1, 3).astype(np.float32)
    if b > 0.0:
        np.clip(y, 0.0, 255.0 / b, out=y)  # y1 / b
    else:
        y.fill(0.0)
    m = float(_ones(len(y)) @ y @ _GREY32) * b / len(y)  # mean grey of y1 (column sums by gemv: 4x faster than y @ w)
    sat = saturation_matrices(np.float32(s))[0].T  # row vectors: y3 = y2 @ sat
    if c > 1.0:  # y2 can leave [0, 255]: clamp it before the saturation step
        y *= np.float32(c * b)
        y += np.float32((1.0 - c) * m)
        np.clip(y, 0.0, 255.0, out=y)
        y = y @ sat
    else:
        y = y @ (sat * np.float32(c * b))
        y += np.float32((1.0 - c) * m)  # sat maps a grey (k, k, k) to itself: the offset passes through
    np.clip(y, 0.0, 255.0, out=y)
    np.rint(y, out=y)
    np.copyto(dst, y.reshape(dst.shape), casting="unsafe")
    return dst


_ONES: dict[int, np.ndarray] = {}


def _ones(n: int) -> np.ndarray:
    if n not in _ONES:
        _ONES[n] = np.ones(n, np.float32)
    return _ONES[n]


def crop_box(p: AugParams, i: int) -> Box:
    return int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i])


def view_from_crop(crop: torch.Tensor, p: AugParams, i: int, size: int, dst: np.ndarray | None = None) -> np.ndarray:
    """Row i's resize, flip and colour applied to its decoded crop: (size, size, 3) uint8 HWC in `dst`
    (e.g. the batch's shared-memory slot) or a new array. The flip comes first, on uint8: colour is
    per pixel plus a global mean, so the order does not change a pixel, and the copy is 4x smaller."""
    small = resize_uint8(crop, (size, size)).permute(1, 2, 0)  # HWC, contiguous
    if p.flip[i]:
        small = small.flip(1)
    dst = np.empty((size, size, 3), np.uint8) if dst is None else dst
    b, c, s = float(p.brightness[i]), float(p.contrast[i]), float(p.saturation[i])
    if b == 1.0 and c == 1.0 and s == 1.0:
        dst[...] = small.numpy()
        return dst
    return colour_into(small.numpy(), b, c, s, dst)


def train_view(img: torch.Tensor, p: AugParams, i: int, size: int, dst: np.ndarray | None = None) -> np.ndarray:
    """Row i of the params applied to a whole decoded (3, H, W) image (see `view_from_crop`)."""
    t, l, h, w = crop_box(p, i)
    return view_from_crop(img[:, t:t + h, l:l + w], p, i, size, dst)


def val_view(img: torch.Tensor, spec: AugSpec) -> torch.Tensor:
    """Shorter side -> val_resize, centre crop image_size: (S, S, 3) uint8."""
    rh, rw, (t, l, h, w) = val_geometry(spec, int(img.shape[1]), int(img.shape[2]))
    return resize_uint8(img, (rh, rw))[:, t:t + h, l:l + w].permute(1, 2, 0)
