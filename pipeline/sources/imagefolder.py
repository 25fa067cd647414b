"""Any class-folder dataset: ROOT/train/<class>/... and optionally ROOT/val/<class>/..., like torchvision's
ImageFolder, found into the same `ImageNetTree` the ImageNet discovery gives, so one shard writer serves both.

Classes are the train/ folder names in sorted order (label i = i-th name, any names, any count). Images are
found by extension anywhere below a class folder (symlinked folders followed, as ImageFolder does); a folder
that links back to one of its own ancestors is listed as rejected instead of walked forever. Without val/,
`val_share` carves a class-stratified validation split from train: within each class, files are ranked by
sha256(seed, path) and the first round(share * n) go to val (at least one, and at least one kept for train,
when the class has two or more files). The ranking depends only on the seed and the file's own path, so
adding files to a class moves few others between the splits.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.core.errors import ConfigError, MissingDataError, TreeLayoutError
from pipeline.sources.imagenet import ImageNetTree, SourceFile, is_dir_entry, is_image_entry, printable

LOOSE = "not inside a class folder"
DEAD_LINK = "symlink that leads nowhere (a loop or a missing target)"
LOOP = "symlink loop: this folder contains itself"
ESCAPE = ("symlink to the tree's root, a split or another class folder: its images would be counted again, under "
          "this class")


def tree_folders(root: Path) -> frozenset:
    """(st_dev, st_ino) of the root, train/, val/ and every class folder in them: what a class's images are not."""
    dirs = [root] + [root / s for s in ("train", "val") if (root / s).is_dir()]
    found = {(st.st_dev, st.st_ino) for d in dirs for st in [os.stat(d)]}
    for d in dirs[1:]:
        for e in os.scandir(d):
            if is_dir_entry(e):
                st = os.stat(e.path)
                found.add((st.st_dev, st.st_ino))
    return frozenset(found)


def class_folders(split_dir: Path, split: str, rejected: list[tuple[str, str, str]]) -> list[str]:
    """Sorted names of the class folders in train/ or val/. Loose images and dead links are noted in
    `rejected`; other loose files (a README) are ignored."""
    names = []
    for e in os.scandir(split_dir):
        if is_dir_entry(e):
            names.append(e.name)
        elif is_image_entry(e):
            rejected.append((split, f"{split}/{e.name}", LOOSE))
        elif e.is_symlink() and not os.path.exists(e.path):
            rejected.append((split, f"{split}/{e.name}", DEAD_LINK))
    return sorted(names)


def images_below(folder: Path, rel: str, split: str, rejected: list[tuple[str, str, str]],
                 ancestors: frozenset = frozenset(), fenced: frozenset = frozenset()) -> list[str]:
    """Relative paths of the image files anywhere below `folder` (whose path relative to the root is `rel`).
    `fenced`: folders a symlink below it must not lead into (the root, the splits, the other class folders)."""
    st = os.stat(folder)
    here = (st.st_dev, st.st_ino)
    if here in ancestors:
        rejected.append((split, rel, LOOP))
        return []
    if here in fenced:
        rejected.append((split, rel, ESCAPE))
        return []
    out = []
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_dir_entry(e):
            out += images_below(Path(e.path), f"{rel}/{e.name}", split, rejected, ancestors | {here}, fenced)
        elif is_image_entry(e):
            out.append(f"{rel}/{e.name}")
    return out


def carve_val(files: list[SourceFile], share: float, seed: int) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, val) of one class's files: the round(share * n) files ranked first by sha256(seed, path)."""
    n = len(files)
    k = min(n - 1, max(1, round(share * n))) if n >= 2 else 0

    def rank(f: SourceFile) -> bytes:
        return hashlib.sha256(f"{seed}\t{f.rel}".encode("utf-8", "surrogateescape")).digest()

    chosen = {f.rel for f in sorted(files, key=rank)[:k]}
    return [f for f in files if f.rel not in chosen], [f for f in files if f.rel in chosen]


def discover_imagefolder(root: str | Path, *, val_share: float | None = None, seed: int = 0) -> ImageNetTree:
    """Find train (and val) images of a class-folder tree; classes are train/'s folders, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"image folder tree not found: {root}")
    if not (root / "train").is_dir():
        raise MissingDataError(f"{root}: no train/ folder (expected ROOT/train/<class>/<images>)")
    if val_share is not None and not 0.0 < val_share < 1.0:
        raise ConfigError(f"--val-share must lie strictly between 0 and 1, got {val_share}")
    rejected: list[tuple[str, str, str]] = []
    classes = class_folders(root / "train", "train", rejected)
    if not classes:
        raise TreeLayoutError(f"{root / 'train'}: no class folders (expected train/<class>/<images>)")
    labels = {c: i for i, c in enumerate(classes)}

    folders = tree_folders(root)

    def files_of(split: str, names: list[str]) -> list[SourceFile]:
        def below(c: str) -> list[str]:
            st = os.stat(root / split / c)
            return images_below(root / split / c, f"{split}/{c}", split, rejected,
                                fenced=folders - {(st.st_dev, st.st_ino)})

        return [SourceFile(rel, c, labels[c]) for c in names for rel in below(c)]

    train = files_of("train", classes)
    empty = sorted(set(classes) - {f.wnid for f in train})
    if empty:
        raise TreeLayoutError(f"{root / 'train'}: class folders without images: "
                              f"{', '.join(map(printable, empty[:20]))}; add images or remove the folders")
    tree = ImageNetTree(root=root, classes=classes, rejected=rejected,
                        dataset={"layout": "imagefolder", "val_share": val_share})
    if (root / "val").is_dir():
        if val_share is not None:
            raise ConfigError(f"{root / 'val'} exists, and --val-share carves val from train only when there is "
                              f"none: drop --val-share, or move val/ away")
        val_classes = class_folders(root / "val", "val", rejected)
        unknown = [c for c in val_classes if c not in labels]
        if unknown:
            raise TreeLayoutError(f"{root / 'val'}: class folders with no train/ counterpart: "
                                  f"{', '.join(map(printable, unknown[:20]))}")
        tree.splits["train"], tree.splits["val"], tree.val_layout = train, files_of("val", val_classes), "folders"
    elif val_share is not None:
        tree.splits["train"], tree.splits["val"] = [], []
        for c in classes:
            t, v = carve_val([f for f in train if f.wnid == c], val_share, seed)
            tree.splits["train"] += t
            tree.splits["val"] += v
        tree.val_layout = "carved"
    else:
        tree.splits["train"] = train
    return tree
