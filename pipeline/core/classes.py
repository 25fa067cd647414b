"""Class lists: the canonical ImageNet-100 selection, wnid -> name, and the label rule.

Integer labels are positions in the SORTED list of selected wnids (what torchvision's
ImageFolder and solo-learn do), never the order of a list file.
"""
from __future__ import annotations

import csv
import gzip
import io
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path

from pipeline.core.errors import ConfigError, MissingDataError

WNID_RE = re.compile(r"^n\d{8}$")


def _data_text(name: str) -> str:
    data = resources.files("pipeline") / "data" / name
    raw = data.read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def parse_class_list(text: str, source: str = "<class list>") -> list[str]:
    """wnids from a list file: one a line; blank lines and '#' comments ignored; order kept."""
    wnids: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        wnid = line.split()[0]
        if not WNID_RE.match(wnid):
            raise ConfigError(f"{source}:{lineno}: {wnid!r} is not a WordNet id like n01440764")
        wnids.append(wnid)
    dupes = sorted({w for w in wnids if wnids.count(w) > 1})
    if dupes:
        raise ConfigError(f"{source}: repeated wnids: {', '.join(dupes)}")
    if not wnids:
        raise ConfigError(f"{source}: no wnids found")
    return wnids


def imagenet100_wnids() -> list[str]:
    """The canonical ImageNet-100 list (CMC paper order, not sorted)."""
    return parse_class_list(_data_text("imagenet100.txt"), "imagenet100.txt")


def load_class_list(path: str | Path | None) -> list[str]:
    """wnids from a list file, or the canonical ImageNet-100 list when path is None."""
    if path is None:
        return imagenet100_wnids()
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"class list file not found: {path}")
    return parse_class_list(read_text_file(path, "class list"), str(path))


def read_text_file(path: Path, what: str) -> str:
    """A small UTF-8 text file the user named; a bad byte is an error naming the file, byte and offset."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: {what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          f"save it as UTF-8") from None


def sorted_classes(wnids: list[str]) -> list[str]:
    """The label order: label i is sorted(wnids)[i]."""
    return sorted(wnids)


@lru_cache(maxsize=1)
def imagenet1k() -> tuple[tuple[str, str], ...]:
    """(wnid, name) for the 1000 ILSVRC2012 classes, in torchvision's index order."""
    rows = list(csv.reader(io.StringIO(_data_text("imagenet1k_classes.tsv")), delimiter="\t"))
    out = []
    for i, (index, wnid, name) in enumerate(rows[1:]):
        assert int(index) == i, "imagenet1k_classes.tsv must be in index order"
        out.append((wnid, name))
    return tuple(out)


def wnid_names() -> dict[str, str]:
    """wnid -> human-readable name for the 1000 ImageNet-1k classes."""
    return {wnid: name for wnid, name in imagenet1k()}


def is_imagenet1k(classes: list[str]) -> bool:
    """True when every class is an ImageNet-1k wnid: only then can a 1000-way head be sliced to them."""
    known = {wnid for wnid, _ in imagenet1k()}
    return bool(classes) and all(c in known for c in classes)


def imagenet1k_indices(wnids: list[str]) -> list[int]:
    """Column of each wnid in a 1000-way ImageNet-1k head (for slicing a teacher's head)."""
    pos = {wnid: i for i, (wnid, _) in enumerate(imagenet1k())}
    missing = [w for w in wnids if w not in pos]
    if missing:
        raise ValueError(f"not ImageNet-1k classes: {', '.join(missing)}")
    return [pos[w] for w in wnids]


@lru_cache(maxsize=1)
def default_val_labels() -> dict[str, str]:
    """ILSVRC2012 validation ground truth shipped with kdpipe: file name -> wnid (50,000 rows)."""
    rows = csv.reader(io.StringIO(_data_text("imagenet_val_labels.tsv.gz")), delimiter="\t")
    next(rows)
    return {fname: wnid for fname, wnid in rows}


def read_val_labels(path: str | Path) -> dict[str, str]:
    """Validation labels from a 'file<TAB>wnid' file or Kaggle's LOC_val_solution.csv.

    Keys are file names with their extension ('ILSVRC2012_val_00000001.JPEG'); Kaggle's ids
    have no extension, so '.JPEG' is added.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"validation labels file not found: {path}")
    text = read_text_file(path, "validation labels file")
    first = text.splitlines()[0] if text else ""
    labels: dict[str, str] = {}
    if first.startswith("ImageId,PredictionString"):
        for lineno, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if lineno == 1 or not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise ConfigError(f"{path}:{lineno}: expected 'ImageId,PredictionString', got {row!r}")
            image_id, wnid = row[0], row[1].split()[0]
            labels[image_id if "." in image_id else image_id + ".JPEG"] = wnid
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            parts = line.strip().split("\t")
            if not line.strip() or (lineno == 1 and parts[0] == "file"):
                continue
            if len(parts) != 2:
                raise ConfigError(f"{path}:{lineno}: expected 'file<TAB>wnid', got {line!r}")
            labels[parts[0]] = parts[1]
    bad = [w for w in set(labels.values()) if not WNID_RE.match(w)]
    if bad:
        raise ConfigError(f"{path}: not WordNet ids: {', '.join(sorted(bad)[:5])}")
    return labels
