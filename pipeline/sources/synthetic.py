"""ImageNet-shaped synthetic trees for tests, demos and benchmarks (nothing downloads).

`make_imagenet_tree` writes the real ILSVRC2012 layout: train/<wnid>/<wnid>_<n>.JPEG, and val
either as class folders or flat ILSVRC2012_val_<8 digits>.JPEG. Flat val files take real
validation file names of their class from the shipped ground truth, so the default labels apply.
On request it adds the oddities real ImageNet has and broken files a tool must survive.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.classes import default_val_labels
from pipeline.core.errors import ConfigError
from pipeline.core.log import get_logger
from pipeline.core.progress import progress_bar

logger = get_logger(__name__)

# Kinds of odd-but-valid and broken files the generator can plant (class folder of the 1st class).
ODDITIES = ("cmyk", "png_as_jpeg", "greyscale")
BROKEN = ("truncated", "zero_byte", "not_an_image")
STRAY = ("stray_txt",)  # non-image files that a tree walker must ignore


@dataclass
class SyntheticTree:
    """What was written: paths relative to root, grouped so tests can assert on them."""

    root: Path
    wnids: list[str]
    train: dict[str, list[str]] = field(default_factory=dict)  # wnid -> relative paths (valid images)
    val: dict[str, list[str]] = field(default_factory=dict)
    oddities: dict[str, str] = field(default_factory=dict)  # kind -> relative path (valid, needs re-encode or RGB)
    broken: dict[str, str] = field(default_factory=dict)  # kind -> relative path (must be rejected)
    stray: list[str] = field(default_factory=list)  # must be ignored

    def count(self, split: str) -> int:
        return sum(len(v) for v in getattr(self, split).values())


def synth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An HxWx3 uint8 image with smooth colour, a shape and fine texture (JPEG size like a photo)."""
    coarse = rng.integers(0, 256, size=(max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    cy, cx = rng.integers(0, height), rng.integers(0, width)
    r = max(2, int(rng.integers(min(height, width) // 8 + 1, min(height, width) // 3 + 2)))
    yy, xx = np.ogrid[:height, :width]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 256, size=3)
    img += rng.normal(0, 18, size=img.shape).astype(np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(img: np.ndarray | Image.Image, quality: int = 90, mode: str | None = None) -> bytes:
    pil = img if isinstance(img, Image.Image) else Image.fromarray(img)
    if mode:
        pil = pil.convert(mode)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


MAX_SIDE = 4096  # a drawn image takes ~40 bytes a pixel while it is made: 4096 x 4096 is ~0.7 GB


def check_tree_args(root: str | Path, wnids: list[str], train_per_class: int, val_per_class: int,
                    size: tuple[int, ...], min_side: int = 1, min_classes: int = 1) -> None:
    """Refuse arguments that would write nothing, a truncated tree or a crash halfway (ConfigError naming
    the argument): a root that is a file, too few or repeated classes, counts below 1 train / 0 val per
    class, image sides below min_side or over MAX_SIDE (size is (h, w) or, for make_imagenet_tree,
    (hmin, hmax, wmin, wmax))."""
    if Path(root).exists() and not Path(root).is_dir():
        raise ConfigError(f"{root} is a file, not a directory: give a directory (new or existing) for the tree")
    if len(wnids) < min_classes:
        raise ConfigError(f"need at least {min_classes} class{'es' if min_classes > 1 else ''} (--num-classes), "
                          f"got {len(wnids)}")
    if len(set(wnids)) != len(wnids):
        raise ConfigError(f"repeated classes: {sorted({w for w in wnids if list(wnids).count(w) > 1})}")
    if train_per_class < 1 or val_per_class < 0:
        raise ConfigError(f"need train_per_class (--train-per-class) >= 1 and val_per_class (--val-per-class) >= 0 "
                          f"images per class, got {train_per_class} and {val_per_class}")
    if len(size) not in (2, 4) or min(size) < min_side or max(size) > MAX_SIDE or (
            len(size) == 4 and (size[0] > size[1] or size[2] > size[3])):
        raise ConfigError(f"size (--size) {tuple(size)} is too small, too large or malformed: need (height, width) "
                          f"or (hmin, hmax, wmin, wmax) with sides of {min_side}..{MAX_SIDE} px")


SYNTH_MARKER = ".kdpipe-synth"


def claim_tree(root: Path, record: dict) -> None:
    """Write a tree only into a new or empty directory, or over a tree this generator made with the same
    settings (it then writes the same bytes again: a rerun completes an interrupted tree); anything else is
    refused naming what it holds or the settings that differ (pipeline/core/outdir.py)."""
    from pipeline.core.outdir import claim_dir

    claim_dir(root, SYNTH_MARKER, "a synthetic tree", record=record)


def _size(rng: np.random.Generator, size: tuple[int, int] | tuple[int, int, int, int]) -> tuple[int, int]:
    """size is (h, w) fixed, or (hmin, hmax, wmin, wmax) drawn per image."""
    if len(size) == 2:
        return int(size[0]), int(size[1])
    hmin, hmax, wmin, wmax = size
    return int(rng.integers(hmin, hmax + 1)), int(rng.integers(wmin, wmax + 1))


def make_imagenet_tree(
    root: str | Path,
    wnids: list[str],
    *,
    train_per_class: int = 4,
    val_per_class: int = 2,
    val_layout: str | None = "folders",
    size: tuple[int, ...] = (375, 500),
    quality: int = 92,
    oddities: bool = False,
    broken: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> SyntheticTree:
    """Write a synthetic ImageNet tree under root and describe it.

    val_layout: "folders" (val/<wnid>/...), "flat" (val/ILSVRC2012_val_*.JPEG, real names of the
    class from the shipped ground truth), or None (no val/ at all).
    """
    if val_layout not in ("folders", "flat", None):
        raise ConfigError(f"val_layout must be 'folders', 'flat' or None, not {val_layout!r}")
    check_tree_args(root, wnids, train_per_class, val_per_class if val_layout else 0, tuple(size))
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality must be in [1, 100], got {quality}")
    root = Path(root)
    claim_tree(root, {"generator": "imagenet", "wnids": list(wnids), "train_per_class": train_per_class,
                      "val_per_class": val_per_class, "val_layout": val_layout, "size": list(size), "quality": quality,
                      "oddities": oddities, "broken": broken, "seed": seed})
    rng = np.random.default_rng(seed)
    tree = SyntheticTree(root=root, wnids=list(wnids))
    val_names = _flat_val_names(wnids, val_per_class) if val_layout == "flat" else {}

    jobs = []
    for wnid in wnids:
        for n in range(train_per_class):
            jobs.append(("train", wnid, f"train/{wnid}/{wnid}_{n + 1}.JPEG"))
        for n in range(val_per_class if val_layout else 0):
            rel = (f"val/{wnid}/ILSVRC2012_val_{wnid}_{n}.JPEG" if val_layout == "folders"
                   else f"val/{val_names[wnid][n]}")
            jobs.append(("val", wnid, rel))
    logger.debug(f"synth: {len(jobs)} images of {len(wnids)} classes into {root}")
    for split, wnid, rel in progress_bar(jobs, desc="synth", unit="img", enabled=progress):
        h, w = _size(rng, size)
        _write(root / rel, jpeg_bytes(synth_image(rng, h, w), quality))
        getattr(tree, split).setdefault(wnid, []).append(rel)

    if oddities or broken:
        _plant(tree, rng, _size(rng, size), oddities=oddities, broken=broken)
    return tree


def _flat_val_names(wnids: list[str], per_class: int) -> dict[str, list[str]]:
    by_wnid: dict[str, list[str]] = {}
    for fname, wnid in default_val_labels().items():
        by_wnid.setdefault(wnid, []).append(fname)
    out = {}
    for wnid in wnids:
        names = sorted(by_wnid.get(wnid, []))
        if len(names) < per_class:
            raise ConfigError(f"{wnid} has {len(names)} real validation names, {per_class} asked for; the flat val "
                              "layout needs ImageNet-1k wnids and at most 50 val images per class")
        out[wnid] = names[:per_class]
    return out


def _plant(tree: SyntheticTree, rng: np.random.Generator, hw: tuple[int, int], *, oddities: bool, broken: bool) -> None:
    wnid = tree.wnids[0]
    folder = f"train/{wnid}"
    img = synth_image(rng, *hw)
    files: dict[str, tuple[str, bytes]] = {}
    if oddities:
        png = io.BytesIO()
        Image.fromarray(img).save(png, format="PNG")
        files["cmyk"] = (f"{folder}/{wnid}_9001.JPEG", jpeg_bytes(img, mode="CMYK"))
        files["png_as_jpeg"] = (f"{folder}/{wnid}_9002.JPEG", png.getvalue())
        files["greyscale"] = (f"{folder}/{wnid}_9003.jpeg", jpeg_bytes(img, mode="L"))  # lower-case extension too
    if broken:
        whole = jpeg_bytes(img)
        files["truncated"] = (f"{folder}/{wnid}_9101.JPEG", whole[: len(whole) // 2])
        files["zero_byte"] = (f"{folder}/{wnid}_9102.JPEG", b"")
        files["not_an_image"] = (f"{folder}/{wnid}_9103.JPEG", b"this is not an image\n")
        _write(tree.root / folder / "notes.txt", b"a stray file that is not an image\n")
        tree.stray.append(f"{folder}/notes.txt")
    for kind, (rel, data) in files.items():
        _write(tree.root / rel, data)
        (tree.oddities if kind in ODDITIES else tree.broken)[kind] = rel
        if kind in ODDITIES:
            tree.train[wnid].append(rel)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
