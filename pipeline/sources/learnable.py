"""A learnable ImageNet-shaped dataset: 100 classes of drawn images a small CNN can learn on a CPU.

Each class is a family: a shape type (10 kinds), a colour (10 hues), a stripe texture and a background
tone, all fixed per class; position, scale, rotation, colour jitter, background pattern and a clutter
blob vary per image. A controlled share of samples is made ambiguous on purpose, so a teacher's
confidence really varies across samples (what the uncertainty weight is about):

- "mix":     blended with an image of another class (the other class takes 35-50 % of the pixels);
- "occlude": a large patch covers most of the shape;
- "noise":   heavy pixel noise at low contrast.

Files use the real ILSVRC2012 layout (train/<wnid>/<wnid>_<n>.JPEG, val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG),
so every tool that reads ImageNet reads this too. Everything is a pure function of the seed.
Drawing is vectorised over images; JPEG encoding is the main cost.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_write_json
from pipeline.core.classes import imagenet100_wnids
from pipeline.core.errors import ConfigError
from pipeline.core.progress import progress_bar
from pipeline.sources.synthetic import check_tree_args, claim_tree, jpeg_bytes

SHAPES = ("disk", "square", "triangle", "ring", "cross", "dumbbell", "star", "bar", "crescent", "frame")
HUES = 10  # colour families, 36 degrees apart
AMBIGUOUS_KINDS = ("mix", "occlude", "noise")
DESCRIPTION_FILE = "learnable.json"  # at the tree root; ImageNet readers look only in train/ and val/
CHUNK = 256  # images drawn at once (bounds memory: CHUNK * H * W * 3 float32)


@dataclass(frozen=True)
class ClassTable:
    """Per-class attributes, one row per class (arrays of length C)."""

    shape: np.ndarray  # int, index into SHAPES
    hue: np.ndarray  # float in [0, 1)
    stripe_freq: np.ndarray  # stripes per shape radius (0 = flat colour)
    stripe_angle: np.ndarray  # radians, in the shape's own frame (turns with the shape)
    bg_hue: np.ndarray  # float in [0, 1)


@dataclass
class LearnableTree:
    """What was written. Paths are relative to root; `ambiguous` maps a path to its kind and other class."""

    root: Path
    wnids: list[str]
    size: tuple[int, int]
    seed: int
    ambiguous_share: float
    train: dict[str, list[str]] = field(default_factory=dict)  # wnid -> relative paths
    val: dict[str, list[str]] = field(default_factory=dict)
    ambiguous: dict[str, dict] = field(default_factory=dict)  # rel path -> {"kind": ..., "other": wnid | None}

    def count(self, split: str) -> int:
        return sum(len(v) for v in getattr(self, split).values())

    def ambiguous_in(self, split: str) -> list[str]:
        return [p for p in self.ambiguous if p.startswith(f"{split}/")]

    def to_json(self) -> dict:
        d = asdict(self)
        d["root"] = str(self.root)
        d["size"] = list(self.size)
        d["shapes"] = list(SHAPES)
        return d


def class_table(num_classes: int, seed: int) -> ClassTable:
    """Assign each class a distinct (shape, hue) pair plus a texture and background tone.

    With up to 100 classes every class has its own (shape, hue) pair. Beyond 100, pairs repeat and such
    classes differ only in stripes, stripe angle and background tone (the dataset is meant for <= 100).
    The assignment is a seeded permutation, so labels and looks are not aligned in an obvious order.
    """
    rng = np.random.default_rng([seed, 1])
    combo = rng.permutation(max(num_classes, len(SHAPES) * HUES))[:num_classes]
    shape = combo % len(SHAPES)
    hue_bin = (combo // len(SHAPES)) % HUES
    stripe_freq = np.array([0.0, 1.2, 2.4])[(combo * 7 + combo // len(SHAPES)) % 3]
    stripe_angle = rng.uniform(0, np.pi, num_classes)
    bg_hue = ((hue_bin + 5 + rng.integers(-2, 3, num_classes)) % HUES) / HUES  # away from the shape's hue
    return ClassTable(shape=shape, hue=hue_bin / HUES, stripe_freq=stripe_freq,
                      stripe_angle=stripe_angle, bg_hue=bg_hue)


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB in [0, 1]; inputs broadcast, output has a trailing axis of 3."""
    h = np.mod(h, 1.0) * 6.0
    k = np.stack([(5 + h) % 6, (3 + h) % 6, (1 + h) % 6], axis=-1)
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test for one shape kind, in the shape's own unit frame (radius about 1)."""
    r2 = u * u + v * v
    name = SHAPES[kind]
    if name == "disk":
        return r2 < 1.0
    if name == "square":
        return np.maximum(abs(u), abs(v)) < 0.85
    if name == "triangle":
        a = np.array([np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3])
        return np.max([u * np.cos(t) + v * np.sin(t) for t in a], axis=0) < 0.55
    if name == "ring":
        return (r2 < 1.0) & (r2 > 0.5**2)
    if name == "cross":
        return ((abs(u) < 0.32) & (abs(v) < 1.0)) | ((abs(v) < 0.32) & (abs(u) < 1.0))
    if name == "dumbbell":
        return ((abs(u) - 0.55) ** 2 + v * v < 0.45**2) | ((abs(u) < 0.6) & (abs(v) < 0.15))
    if name == "star":
        return np.sqrt(r2) < 0.55 + 0.42 * np.cos(5 * np.arctan2(v, u))
    if name == "bar":
        return (u / 1.1) ** 2 + (v / 0.38) ** 2 < 1.0
    if name == "crescent":
        return (r2 < 1.0) & ((u - 0.5) ** 2 + v * v > 0.8**2)
    if name == "frame":
        m = np.maximum(abs(u), abs(v))
        return (m < 0.9) & (m > 0.58)
    raise ValueError(f"unknown shape kind {kind}")


def draw_params(rng: np.random.Generator, n: int, hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """Per-image variation, drawn for n images at once (position, scale, rotation, colour, clutter).

    Lengths are in units of the image's longer side; the centre stays in the middle 40 % of each side."""
    h, w = hw
    return {
        "cx": rng.uniform(0.3, 0.7, n) * w / max(h, w), "cy": rng.uniform(0.3, 0.7, n) * h / max(h, w),
        "radius": rng.uniform(0.2, 0.32, n), "rot": rng.uniform(0, 2 * np.pi, n),
        "hue_jit": rng.uniform(-0.025, 0.025, n), "sat": rng.uniform(0.6, 0.95, n), "val": rng.uniform(0.7, 1.0, n),
        "phase": rng.uniform(0, 2 * np.pi, n),
        "bg_sat": rng.uniform(0.1, 0.35, n), "bg_val": rng.uniform(0.25, 0.6, n),
        "bg_ang": rng.uniform(0, 2 * np.pi, n), "bg_freq": rng.uniform(1.0, 4.0, n), "bg_amp": rng.uniform(0, 0.12, n),
        "bg_grad": rng.uniform(-0.15, 0.15, n),
        "blob": rng.random(n) < 0.5, "blob_x": rng.random(n), "blob_y": rng.random(n),
        "blob_r": rng.uniform(0.05, 0.12, n), "blob_hue": rng.random(n), "blob_val": rng.uniform(0.3, 1.0, n),
    }


def render(labels: np.ndarray, p: dict[str, np.ndarray], table: ClassTable, hw: tuple[int, int]) -> np.ndarray:
    """Draw images of the given classes: float32 (n, H, W, 3) in [0, 1]."""
    h, w = hw
    n = len(labels)
    col = lambda a: np.asarray(a, dtype=np.float32)[:, None, None]  # noqa: E731 - (n,) -> (n, 1, 1)
    ys = (np.arange(h, dtype=np.float32) + 0.5) / max(h, w)
    xs = (np.arange(w, dtype=np.float32) + 0.5) / max(h, w)
    y, x = ys[None, :, None], xs[None, None, :]

    # Background: a class tone, a gradient and a low-frequency wave that vary per image.
    proj = x * np.cos(col(p["bg_ang"])) + y * np.sin(col(p["bg_ang"]))
    wave = np.sin(2 * np.pi * col(p["bg_freq"]) * proj)
    bg_v = col(p["bg_val"]) + col(p["bg_grad"]) * (proj - 0.5) + col(p["bg_amp"]) * wave
    # Hue and saturation are constant per image, so RGB is value times a per-image colour (cheap).
    bg_rgb = hsv_to_rgb(table.bg_hue[labels], p["bg_sat"], np.ones(n)).astype(np.float32)
    img = np.clip(bg_v, 0, 1)[..., None] * bg_rgb[:, None, None, :]

    # Clutter: a small blob of any colour, so a class is never just "the only coloured thing".
    blob = col(p["blob"]) * (((x - col(p["blob_x"])) ** 2 + (y - col(p["blob_y"])) ** 2) < col(p["blob_r"]) ** 2)
    blob_rgb = hsv_to_rgb(p["blob_hue"], np.full(n, 0.7), p["blob_val"])[:, None, None, :]
    img = img * (1 - blob[..., None]) + blob_rgb * blob[..., None]

    # The class's shape, in its own rotated frame, filled with the class colour and stripes.
    dx, dy = (x - col(p["cx"])) / col(p["radius"]), (y - col(p["cy"])) / col(p["radius"])
    c, s = np.cos(col(p["rot"])), np.sin(col(p["rot"]))
    u, v = c * dx + s * dy, -s * dx + c * dy
    mask = np.zeros((n, h, w), dtype=bool)
    shapes = table.shape[labels]
    for kind in np.unique(shapes):
        sel = shapes == kind
        mask[sel] = _shape_mask(int(kind), u[sel], v[sel])
    ang = col(table.stripe_angle[labels])
    along = u * np.cos(ang) + v * np.sin(ang)  # position across the stripes, in the shape's frame
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * col(table.stripe_freq[labels]) * along + col(p["phase"]))
    shade = 1.0 - 0.45 * stripes * (col(table.stripe_freq[labels]) > 0)
    fg_rgb = hsv_to_rgb(table.hue[labels] + p["hue_jit"], p["sat"], p["val"]).astype(np.float32)
    fg = shade[..., None] * fg_rgb[:, None, None, :]
    m = mask[..., None].astype(np.float32)
    return (img * (1 - m) + fg * m).astype(np.float32)


def make_ambiguous(img: np.ndarray, kinds: np.ndarray, other_img: np.ndarray, p: dict[str, np.ndarray],
                   rng: np.random.Generator) -> np.ndarray:
    """Degrade images in place by kind: blend with another class, occlude the shape, or drown in noise."""
    n, h, w, _ = img.shape
    mix = kinds == "mix"
    alpha = rng.uniform(0.35, 0.5, n).astype(np.float32)[:, None, None, None]  # drawn for all: seed-stable
    img[mix] = (1 - alpha[mix]) * img[mix] + alpha[mix] * other_img[mix]
    occ = np.flatnonzero(kinds == "occlude")
    side = rng.uniform(1.3, 1.8, n) * p["radius"]  # patch side, in units of the image's longer side
    jitter = rng.uniform(-0.3, 0.3, (n, 2)) * p["radius"][:, None]
    grey = rng.uniform(0.2, 0.8, n)
    scale = max(h, w)
    for i in occ:
        y0 = int((p["cy"][i] + jitter[i, 0] - side[i] / 2) * scale)
        x0 = int((p["cx"][i] + jitter[i, 1] - side[i] / 2) * scale)
        k = int(side[i] * scale)
        img[i, max(0, y0):max(0, y0 + k), max(0, x0):max(0, x0 + k)] = grey[i]
    noisy = kinds == "noise"
    sigma = rng.uniform(0.15, 0.3, n).astype(np.float32)[:, None, None, None]
    noise = rng.standard_normal((int(noisy.sum()), h, w, 3), dtype=np.float32) * sigma[noisy]
    img[noisy] = 0.5 + 0.6 * (img[noisy] - 0.5) + noise
    return img


def _split_plan(rng: np.random.Generator, labels: np.ndarray, share: float, num_classes: int):
    """Which samples are ambiguous (exactly round(share * N)), their kinds, and the class mixed in."""
    n = len(labels)
    k = int(round(share * n))
    chosen = rng.permutation(n)[:k]
    kinds = np.full(n, "", dtype=object)
    kinds[chosen] = np.array(AMBIGUOUS_KINDS, dtype=object)[rng.integers(0, len(AMBIGUOUS_KINDS), k)]
    other = (labels + rng.integers(1, max(2, num_classes), n)) % max(1, num_classes)  # never the own class
    return kinds, other


def _to_uint8(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = img * 255.0 + 3.0 * rng.standard_normal(img.shape, dtype=np.float32)  # sensor-like grain
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def make_learnable_tree(
    root: str | Path,
    wnids: list[str] | None = None,
    *,
    train_per_class: int = 100,
    val_per_class: int = 20,
    size: int | tuple[int, int] = 64,
    ambiguous_share: float = 0.15,
    seed: int = 0,
    quality: int = 90,
    progress: bool = False,
) -> LearnableTree:
    """Write a learnable ImageNet-layout tree under root and describe it (also saved as root/learnable.json).

    wnids: the classes (default: the canonical ImageNet-100 list). size: pixels, square or (h, w).
    ambiguous_share: fraction of each split made ambiguous (exactly round(share * N) samples).
    """
    if not 0.0 <= ambiguous_share <= 1.0:
        raise ConfigError(f"ambiguous_share must be in [0, 1], not {ambiguous_share}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality must be in [1, 100], got {quality}")
    wnids = list(imagenet100_wnids() if wnids is None else wnids)
    hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(x) for x in size)
    if len(hw) != 2:
        raise ConfigError(f"size {size}: give one side or (height, width)")
    # 16 px: smaller images cannot hold the shapes; 2 classes: an ambiguous "mix" blends in another class
    check_tree_args(root, wnids, train_per_class, val_per_class, hw, min_side=16, min_classes=2)
    root = Path(root)
    claim_tree(root, {"generator": "learnable", "wnids": wnids, "train_per_class": train_per_class,
                      "val_per_class": val_per_class, "size": list(hw), "ambiguous_share": ambiguous_share,
                      "seed": seed, "quality": quality})
    table = class_table(len(wnids), seed)
    tree = LearnableTree(root=root, wnids=wnids, size=hw, seed=seed, ambiguous_share=ambiguous_share)
    streams = np.random.SeedSequence([seed, 2]).spawn(2)
    for split, per_class, ss in (("train", train_per_class, streams[0]), ("val", val_per_class, streams[1])):
        labels = np.repeat(np.arange(len(wnids)), per_class)
        if split == "train":
            rels = [f"train/{wnids[c]}/{wnids[c]}_{j + 1}.JPEG" for c in range(len(wnids)) for j in range(per_class)]
        else:
            rels = [f"val/{wnids[c]}/ILSVRC2012_val_{i + 1:08d}.JPEG" for i, c in enumerate(labels)]
        _write_split(tree, split, labels, rels, table, hw, ambiguous_share, ss, quality, progress)
    atomic_write_json(root / DESCRIPTION_FILE, tree.to_json())
    return tree


def _write_split(tree: LearnableTree, split: str, labels: np.ndarray, rels: list[str], table: ClassTable,
                 hw: tuple[int, int], share: float, ss: np.random.SeedSequence, quality: int, progress: bool) -> None:
    """Draw and write one split in chunks of CHUNK images, on a few threads (numpy and JPEG release the GIL).

    Each chunk has its own random stream (spawned from the split's), so the bytes do not depend on
    thread scheduling.
    """
    plan_ss, *chunk_ss = ss.spawn(1 + (len(labels) + CHUNK - 1) // CHUNK)
    kinds, other = _split_plan(np.random.default_rng(plan_ss), labels, share, len(tree.wnids))

    def one_chunk(k: int) -> int:
        sl = slice(k * CHUNK, (k + 1) * CHUNK)
        rng = np.random.default_rng(chunk_ss[k])
        lab, kin = labels[sl], kinds[sl]
        p, p_other = draw_params(rng, len(lab), hw), draw_params(rng, len(lab), hw)
        img = render(lab, p, table, hw)
        other_img = np.zeros_like(img)
        mix = kin == "mix"
        if mix.any():  # draw the other class only where it is mixed in
            other_img[mix] = render(other[sl][mix], {key: a[mix] for key, a in p_other.items()}, table, hw)
        img = _to_uint8(make_ambiguous(img, kin, other_img, p, rng), rng)
        for i, rel in enumerate(rels[sl]):
            path = tree.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(img[i], quality))
        return len(lab)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool, \
            progress_bar(total=len(labels), desc=f"learnable {split}", unit="img", enabled=progress) as bar:
        for done in pool.map(one_chunk, range(len(chunk_ss))):
            bar.update(done)
    for i, rel in enumerate(rels):
        getattr(tree, split).setdefault(tree.wnids[labels[i]], []).append(rel)
        if kinds[i]:
            tree.ambiguous[rel] = {"kind": kinds[i], "other": tree.wnids[other[i]] if kinds[i] == "mix" else None}
