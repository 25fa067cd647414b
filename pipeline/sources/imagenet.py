"""Discovering a raw ImageNet tree: which files belong to which split and class.

Layouts (ILSVRC2012): train/<wnid>/<file>; val either as class folders val/<wnid>/<file>, or flat
val/ILSVRC2012_val_<8 digits>.JPEG with labels from a file (the shipped ground truth by default).
Kaggle's ILSVRC/Data/CLS-LOC/ nesting is found too. Extensions match case-insensitively; other files
(a stray notes.txt, LOC_val_solution.csv) are ignored. Labels are positions in the sorted wnid list.
Any class-folder tree (not ImageNet) is found by pipeline/sources/imagefolder.py into the same `ImageNetTree`.

File names are whatever the file system holds: a name that is not valid UTF-8 arrives as a str with
surrogate escapes (Python's os functions round-trip it), so it is sharded like any other and hashed by its
bytes. An image-named symlink that leads nowhere (a loop, a dangling link) is kept in the list, and the
shard writer rejects it with the OS's reason (listed in rejected.tsv); it never aborts discovery.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.classes import WNID_RE, default_val_labels, read_val_labels, sorted_classes
from pipeline.core.errors import MissingDataError, TreeLayoutError

IMAGE_EXTS = frozenset({".jpeg", ".jpg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
KAGGLE_SUBDIR = Path("ILSVRC/Data/CLS-LOC")


@dataclass(frozen=True)
class SourceFile:
    """One input image: path relative to the tree root (posix), its class and integer label."""

    rel: str
    wnid: str  # the class id: an ImageNet wnid, or a class folder's name (pipeline/sources/imagefolder.py)
    label: int


@dataclass
class ImageNetTree:
    """What a tree holds for the selected classes (sorted class ids = label order)."""

    root: Path
    classes: list[str]
    splits: dict[str, list[SourceFile]] = field(default_factory=dict)  # "train"/"val" -> files, path-sorted
    val_layout: str | None = None  # "folders", "flat", "carved" (imagefolder --val-share) or None (no val/)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (split, rel, reason) found by discovery
    dataset: dict | None = None  # how a non-ImageNet tree was read (recorded in plan and manifest); None: ImageNet

    def fingerprint(self, split: str) -> str:
        """sha256 of the split's (path, class) list: a resumed run must see the same inputs.

        Names are hashed as the file system's bytes (surrogateescape), so a name that is not valid
        UTF-8 hashes stably, and every valid one hashes as before."""
        h = hashlib.sha256()
        for f in self.splits[split]:
            h.update(f"{f.rel}\t{f.wnid}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()


def printable(name: str) -> str:
    """A file name as one line of valid UTF-8 text for messages and tables (`pipeline.core.names.escape_name`:
    bytes that are not UTF-8 shown as \\xNN, tabs and newlines as \\t and \\n)."""
    from pipeline.core.names import escape_name

    return escape_name(name)


def is_dir_entry(entry: os.DirEntry) -> bool:
    """entry.is_dir() that says False, instead of raising, for a symlink loop or an unreadable link."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def is_image_entry(entry: os.DirEntry) -> bool:
    """An image-named regular file, or an image-named symlink that leads nowhere (a loop, a dangling link:
    kept so the writer lists it in rejected.tsv with the OS's reason). FIFOs, sockets and folders are not."""
    if not is_image_name(entry.name):
        return False
    try:
        if entry.is_file():
            return True
    except OSError:  # ELOOP and friends: stat failed through the link
        return True
    return entry.is_symlink() and not os.path.exists(entry.path)


def is_image_name(name: str) -> bool:
    """Image files by extension, case-insensitively (ImageNet uses .JPEG)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTS


def resolve_root(root: str | Path) -> Path:
    """The folder that holds train/: ROOT itself or Kaggle's ROOT/ILSVRC/Data/CLS-LOC."""
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"ImageNet tree not found: {root}")
    for cand in (root, root / KAGGLE_SUBDIR):
        if (cand / "train").is_dir():
            return cand
    raise MissingDataError(f"{root}: no train/ folder (expected ROOT/train/<wnid>/*.JPEG or {KAGGLE_SUBDIR}/train)")


def _images_in(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if is_image_entry(e))


def _class_folder_files(base: Path, root: Path, wnids: list[str], labels: dict[str, int]) -> list[SourceFile]:
    present = {e.name for e in os.scandir(base) if is_dir_entry(e)}
    missing = [w for w in wnids if w not in present]
    if missing:
        shown = ", ".join(missing[:20]) + (f" ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise MissingDataError(f"{base}: {len(missing)} listed classes have no folder: {shown}")
    out = []
    for wnid in sorted(wnids):
        prefix = (base / wnid).relative_to(root).as_posix()
        out += [SourceFile(f"{prefix}/{name}", wnid, labels[wnid]) for name in _images_in(base / wnid)]
    return out


def detect_val_layout(val: Path) -> str | None:
    """'folders' when val/ has wnid folders, 'flat' when it has images at top level, None when absent/empty."""
    if not val.is_dir():
        return None
    entries = list(os.scandir(val))
    has_folders = any(WNID_RE.match(e.name) and is_dir_entry(e) for e in entries)
    has_files = any(is_image_entry(e) for e in entries)
    if has_folders and has_files:
        raise TreeLayoutError(f"{val}: has both class folders and loose images; use one validation layout")
    return "folders" if has_folders else "flat" if has_files else None


def _flat_val_files(val: Path, root: Path, wnids: list[str], labels: dict[str, int],
                    val_labels: dict[str, str], labels_source: str) -> list[SourceFile]:
    names = _images_in(val)
    unlabeled = [n for n in names if n not in val_labels]
    if unlabeled:
        raise TreeLayoutError(f"{val}: {len(unlabeled)} images have no label in {labels_source} "
                              f"(e.g. {', '.join(map(printable, unlabeled[:5]))}); pass --val-labels FILE")
    selected = set(wnids)
    out = [SourceFile(f"{val.relative_to(root).as_posix()}/{n}", val_labels[n], labels[val_labels[n]])
           for n in names if val_labels[n] in selected]
    empty = sorted(selected - {f.wnid for f in out})
    if empty:
        raise TreeLayoutError(f"{val}: no validation images for listed classes: {', '.join(empty[:20])}")
    return out


def discover(root: str | Path, wnids: list[str], val_labels: str | Path | None = None) -> ImageNetTree:
    """Find the train and val images of the listed classes; a missing class is an error naming it.

    val_labels: a 'file<TAB>wnid' file or Kaggle's LOC_val_solution.csv for a flat val/; default is
    the ILSVRC2012 ground truth shipped with kdpipe.
    """
    root = resolve_root(root)
    classes = sorted_classes(list(wnids))
    labels = {w: i for i, w in enumerate(classes)}
    tree = ImageNetTree(root=root, classes=classes)
    tree.splits["train"] = _class_folder_files(root / "train", root, classes, labels)
    layout = detect_val_layout(root / "val")
    tree.val_layout = layout
    if layout == "folders":
        tree.splits["val"] = _class_folder_files(root / "val", root, classes, labels)
    elif layout == "flat":
        table = read_val_labels(val_labels) if val_labels is not None else default_val_labels()
        source = str(val_labels) if val_labels is not None else "the shipped ILSVRC2012 labels"
        tree.splits["val"] = _flat_val_files(root / "val", root, classes, labels, table, source)
    seen = {f.wnid for f in tree.splits["train"]}
    empty = [w for w in classes if w not in seen]
    if empty:
        raise TreeLayoutError(f"{root / 'train'}: listed classes have no images: {', '.join(empty[:20])}")
    return tree
