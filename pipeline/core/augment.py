"""Replayable augmentation: every view is a pure function of (spec, seed, epoch, sample id, h, w).

The randomness is counter-based: each random number is a hash of (seed, epoch, id, draw index), so a
sample's crop, flip and colour factors never depend on batch size, order, worker, rank, backend or
process. The crop follows torchvision's `RandomResizedCrop.get_params` rule exactly (area uniform in
`scale`, ratio log-uniform in `ratio`, `round()`, 10 tries, centre-crop fallback clamped to the ratio
range); only the source of uniforms differs. Colour semantics are documented in docs/loader.md.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Callable, Literal

import numpy as np

from pipeline.core.digest import bytes_sha256
from pipeline.core.errors import ConfigError

CROP_TRIES = 10  # torchvision's RandomResizedCrop tries this many random crops before the fallback

# Draw indices (the counter of the RNG). Try t of the crop uses draw t (area in the high 32 bits,
# ratio in the low 32 bits); the rest follow. Changing these changes every view: bump AUG_RNG_VERSION.
_DRAW_POSITION = CROP_TRIES  # top (high bits), left (low bits) inside the chosen crop size
_DRAW_FLIP_BRIGHTNESS = CROP_TRIES + 1
_DRAW_CONTRAST_SATURATION = CROP_TRIES + 2
AUG_RNG_VERSION = 1

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_TWO_M32 = 1.0 / 4294967296.0

# The validation resize: "shorter" = torchvision's Resize(int) (shorter side to val_resize, aspect kept), the
# ImageNet norm; "square" = resize to val_resize x val_resize (the paper's words: "resize to 256x256").
ValResize = Literal["shorter", "square"]


@dataclass(frozen=True)
class AugSpec:
    """What a training view is made of (torchvision defaults of the paper) and the validation view."""

    image_size: int = 224  # output side, pixels
    scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the source area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    flip_p: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.4  # factor uniform in [max(0, 1 - b), 1 + b], like ColorJitter
    contrast: float = 0.4
    saturation: float = 0.4
    # validation: shorter side to this, then centre crop image_size; None keeps the paper's 256/224
    # proportion at any image_size (256 at 224, 37 at 32), so small crops see the whole object
    val_resize: int | None = None
    val_resize_mode: ValResize = "shorter"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(x) for x in self.scale))
        object.__setattr__(self, "ratio", tuple(float(x) for x in self.ratio))
        if self.val_resize is None:
            object.__setattr__(self, "val_resize", round(self.image_size * 256 / 224))
        problems = []
        if self.image_size < 1:
            problems.append(f"image_size must be >= 1, got {self.image_size}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            problems.append(f"scale must be (lo, hi) with 0 < lo <= hi, got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            problems.append(f"ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio}")
        if not 0.0 <= self.flip_p <= 1.0:
            problems.append(f"flip_p must be in [0, 1], got {self.flip_p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.val_resize_mode not in ("shorter", "square"):
            problems.append(f"val_resize_mode must be 'shorter' or 'square', got {self.val_resize_mode!r}")
        if self.val_resize < self.image_size:
            problems.append(f"val_resize ({self.val_resize}) must be >= image_size ({self.image_size})")
        if problems:
            raise ConfigError("invalid AugSpec: " + "; ".join(problems))

    def fingerprint(self) -> str:
        """A stable hash of every field and the RNG version: part of every teacher-cache key."""
        fields = asdict(self) | {"rng_version": AUG_RNG_VERSION}
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return bytes_sha256(text.encode())[:16]


@dataclass(frozen=True)
class AugParams:
    """One row per sample: crop box in source pixels, flip, colour factors (1.0 = unchanged)."""

    top: np.ndarray  # int64
    left: np.ndarray  # int64
    height: np.ndarray  # int64
    width: np.ndarray  # int64
    flip: np.ndarray  # bool
    brightness: np.ndarray  # float32
    contrast: np.ndarray  # float32
    saturation: np.ndarray  # float32

    def __len__(self) -> int:
        return int(self.top.shape[0])


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed hash of uint64 (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def sample_keys(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """Per-sample RNG key: a hash of (seed, epoch, id). uint64, one per id."""
    with np.errstate(over="ignore"):
        # int(): a numpy seed or epoch (np.int64, np.int32) is the same number, not an overflow
        s = _splitmix64(np.array([int(seed) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        se = _splitmix64(s + np.uint64(int(epoch) & 0xFFFFFFFFFFFFFFFF))
        return _splitmix64(se ^ np.asarray(ids, dtype=np.int64).astype(np.uint64))


def draw_bits(keys: np.ndarray, draw: int | np.ndarray) -> np.ndarray:
    """64 random bits for draw index `draw` of each key (counter mode: hash(key + draw * golden))."""
    with np.errstate(over="ignore"):
        d = np.asarray(draw, dtype=np.uint64) + np.uint64(1)
        return _splitmix64(keys ^ _splitmix64(d * _GOLDEN))


def _halves(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two uniforms in [0, 1) from the high and low 32 bits (float64, resolution 2**-32)."""
    return (bits >> _S32).astype(np.float64) * _TWO_M32, (bits & _LOW32).astype(np.float64) * _TWO_M32


def _crop_tries(hh: np.ndarray, ww: np.ndarray, u_area: np.ndarray, u_ratio: np.ndarray,
                scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """One try of the rule for each row: the rounded (h, w); 0 where the try does not fit."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target = hh * ww * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = np.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = np.round(np.sqrt(target * aspect))  # numpy rounds half to even, like Python's round()
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= ww) & (h > 0) & (h <= hh)
    return np.where(ok, h, 0).astype(np.int64), np.where(ok, w, 0).astype(np.int64)


def crop_from_uniforms(
    heights: np.ndarray, widths: np.ndarray,
    try_uniforms: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]],
    u_top: np.ndarray, u_left: np.ndarray, scale: tuple[float, float], ratio: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """torchvision's RandomResizedCrop rule, vectorised, given its uniforms.

    try_uniforms(t, rows) -> (u_area, u_ratio): try t's uniforms in [0, 1) for the given rows; later
    tries are only drawn for rows still without a crop (the common case needs one try).
    u_top, u_left: (N,) uniforms standing in for `torch.randint(0, n)` as
    floor(u * n). Returns (top, left, height, width) int64.
    """
    H, W = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    height, width = np.zeros(len(H), np.int64), np.zeros(len(H), np.int64)
    todo = np.arange(len(H))
    for t in range(CROP_TRIES):
        if not len(todo):
            break
        ua, ur = try_uniforms(t, todo)
        h, w = _crop_tries(H[todo].astype(np.float64), W[todo].astype(np.float64), ua, ur, scale, ratio)
        height[todo], width[todo] = h, w
        todo = todo[h == 0]
    found = height > 0
    # Fallback: centre crop of the whole image, its ratio clamped to the range.
    in_ratio = W.astype(np.float64) / H.astype(np.float64)
    lo, hi = min(ratio), max(ratio)
    fb_w = np.where(in_ratio > hi, np.round(H * hi).astype(np.int64), W)
    fb_h = np.where(in_ratio < lo, np.round(W / lo).astype(np.int64), H)
    height = np.where(found, height, fb_h)
    width = np.where(found, width, fb_w)
    top = np.where(found, np.floor(u_top * (H - height + 1)).astype(np.int64), (H - height) // 2)
    left = np.where(found, np.floor(u_left * (W - width + 1)).astype(np.int64), (W - width) // 2)
    return top, left, height, width


def _factors(u: np.ndarray, amount: float) -> np.ndarray:
    """ColorJitter's factor: uniform in [max(0, 1 - amount), 1 + amount]; exactly 1.0 when amount = 0."""
    lo, hi = max(0.0, 1.0 - amount), 1.0 + amount
    return (lo + (hi - lo) * u).astype(np.float32)


def sample_params(spec: AugSpec, seed: int, epoch: int, ids, heights, widths) -> AugParams:
    """The training view of each sample: pure in (spec, seed, epoch, id, h, w), vectorised."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    heights = np.asarray(heights, dtype=np.int64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    if not (len(ids) == len(heights) == len(widths)):
        raise ValueError(f"ids, heights, widths differ in length: {len(ids)}, {len(heights)}, {len(widths)}")
    if len(ids) and (heights.min() < 1 or widths.min() < 1):
        raise ValueError("every image needs height and width >= 1")
    keys = sample_keys(seed, epoch, ids)
    u_top, u_left = _halves(draw_bits(keys, _DRAW_POSITION))
    top, left, height, width = crop_from_uniforms(
        heights, widths, lambda t, rows: _halves(draw_bits(keys[rows], t)), u_top, u_left, spec.scale, spec.ratio)
    u_flip, u_b = _halves(draw_bits(keys, _DRAW_FLIP_BRIGHTNESS))
    u_c, u_s = _halves(draw_bits(keys, _DRAW_CONTRAST_SATURATION))
    return AugParams(top, left, height, width, u_flip < spec.flip_p, _factors(u_b, spec.brightness),
                     _factors(u_c, spec.contrast), _factors(u_s, spec.saturation))


def val_geometry(spec: AugSpec, height: int, width: int) -> tuple[int, int, tuple[int, int, int, int]]:
    """Validation: the resized size (shorter side -> val_resize, like torchvision's Resize(int); or
    val_resize x val_resize with val_resize_mode "square") and the centre crop box (top, left, h, w) in
    resized pixels, like CenterCrop."""
    if spec.val_resize_mode == "square":
        rh = rw = spec.val_resize
    else:
        short, long_ = (height, width) if height <= width else (width, height)
        new_long = int(spec.val_resize * long_ / short)  # torchvision truncates the long side
        rh, rw = (spec.val_resize, new_long) if height <= width else (new_long, spec.val_resize)
    s = spec.image_size
    if rh < s or rw < s:
        raise ValueError(f"resized image {rh}x{rw} is smaller than the crop {s}")
    top = int(round((rh - s) / 2.0))
    left = int(round((rw - s) / 2.0))
    return rh, rw, (top, left, s, s)


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1, *,
                shuffle: bool = True, pad: bool = True) -> np.ndarray:
    """The ids rank `rank` visits in `epoch`, in order (int64).

    A seeded global permutation per epoch (identity when shuffle=False), split like PyTorch's
    DistributedSampler: with pad=True the permutation is extended by wrapping around to a multiple of
    world_size, so every rank gets ceil(N / world_size) ids (a few ids are seen twice per epoch);
    with pad=False rank r gets positions r, r + world_size, ... (every id exactly once over all ranks,
    counts differ by at most one). Rank r takes positions r::world_size in both cases.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if shuffle:
        rng = np.random.Generator(np.random.PCG64([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch, 0x6B64]))
        order = rng.permutation(num_samples).astype(np.int64)
    else:
        order = np.arange(num_samples, dtype=np.int64)
    if pad and num_samples and num_samples % world_size:
        total = -(-num_samples // world_size) * world_size
        order = np.resize(order, total)  # repeats from the start: wraps the permutation
    return order[rank::world_size]
