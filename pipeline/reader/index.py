"""Random access into shards: sample id -> (shard, offset, size, label, height, width, crc32), and the bytes.

`ShardIndex` is what loaders use from DataLoader worker processes: it pickles without open files
and opens each shard lazily, once per process, then reads an image with one `os.pread`.
"""
from __future__ import annotations

import io
import json
import os
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.core.digest import bytes_sha256, file_sha256
from pipeline.core.errors import ConfigError, CorruptSampleError, MissingDataError, ShardFormatError, one_line
from pipeline.core.names import SAFE_NAME, SAFE_NAME_RULE, check_shard_name
from pipeline.core.remote import is_url, member_url, read_whole

# Row i describes sample id i of a split; `offset` is where the `.jpg` member's data starts in its tar;
# `crc32` is zlib.crc32 of the JPEG bytes (the `jpg_crc32` of the sample's .json), checked on reads.
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("size", "<i8"), ("label", "<i4"),
                        ("height", "<i4"), ("width", "<i4"), ("crc32", "<u4")])
# What kdpipe wrote before the crc32 field: refused with the fix (`kdpipe shard` adds the field).
INDEX_DTYPE_NO_CRC = np.dtype(INDEX_DTYPE.descr[:-1])
MANIFEST = "manifest.json"
MIN_SAMPLE_BYTES = 4 * 512  # four tar members, each at least a 512-byte header: a manifest count sanity bound


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a shard directory (see docs/CONTRACTS.md), checked for the structure readers rely on
    (ShardFormatError naming the file and entry; MissingDataError when absent). A URL's manifest is fetched
    once per process and checked the same way (pipeline/core/remote.py)."""
    if is_url(shard_dir):
        return fetch_manifest(shard_dir)[0]
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise MissingDataError(f"{path}: no manifest; is {shard_dir} a finished `kdpipe shard` output? "
                               "(a run that was stopped writes it last: rerun the same `kdpipe shard` command)")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ShardFormatError(f"{path}: not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                               "rerun `kdpipe shard` to rewrite it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "kdpipe-shards":
        raise ShardFormatError(f"{path}: not a kdpipe shard manifest (no \"format\": \"kdpipe-shards\")")
    check_manifest(manifest, str(path))
    return manifest


def check_manifest(manifest: dict, source: str) -> None:
    """The manifest invariants every reader relies on: per split, shard entries with a confined name,
    ids dense in shard order, counts that add up and fit in the shard's bytes. Pure (no file access)."""
    def bad(where: str, what: str) -> ShardFormatError:
        return ShardFormatError(f"{source}: {where}: {what}; the manifest is damaged: rerun `kdpipe shard`")

    def integer(value, where: str) -> int:
        if type(value) is not int or value < 0:
            raise bad(where, f"{value!r} is not a count (non-negative integer)")
        return value

    classes, splits = manifest.get("classes"), manifest.get("splits")
    if not isinstance(classes, list) or not all(isinstance(c, dict) and isinstance(c.get("wnid"), str)
                                                for c in classes):
        raise bad("classes", "expected a list of {\"label\", \"wnid\", \"name\"}")
    if not isinstance(splits, dict):
        raise bad("splits", "expected an object of splits")
    for split, info in splits.items():
        if not SAFE_NAME.fullmatch(split):
            raise bad("splits", f"split name {split!r} is not a plain name ({SAFE_NAME_RULE})")
        where = f"splits.{split}"
        if not isinstance(info, dict) or not isinstance(info.get("shards"), list):
            raise bad(where, "expected {\"count\", \"shards\": [...]}")
        next_id = 0
        for k, entry in enumerate(info["shards"]):
            at = f"{where}.shards[{k}]"
            if not isinstance(entry, dict):
                raise bad(at, "expected an object")
            check_shard_name(entry.get("name"), f"{source}: {at}.name")
            if integer(entry.get("first_id"), f"{at}.first_id") != next_id:
                raise bad(at, f"first_id {entry['first_id']}, expected {next_id} (ids are dense, in shard order)")
            count, nbytes = integer(entry.get("count"), f"{at}.count"), integer(entry.get("bytes"), f"{at}.bytes")
            if count * MIN_SAMPLE_BYTES > nbytes:
                raise bad(at, f"count {count} cannot fit in {nbytes} bytes")
            if not isinstance(entry.get("sha256"), str):
                raise bad(at, "no sha256")
            next_id += count
        if integer(info.get("count"), f"{where}.count") != next_id:
            raise bad(f"{where}.count", f"{info['count']}, but its shards hold {next_id} samples")


def shard_file(shard_dir: str | Path, name: str, source: str) -> Path:
    """shard_dir/name, refused (ShardFormatError naming the entry) unless the name is a plain file name and
    the file, after following symlinks, lies inside shard_dir. A missing file passes (readers report it)."""
    path = Path(shard_dir) / check_shard_name(name, source)
    real, root = os.path.realpath(path), os.path.realpath(shard_dir)
    if os.path.commonpath([real, root]) != root:
        raise ShardFormatError(f"{source}: shard {name!r} is a symlink to {real}, outside the shard directory "
                               f"{root}; refused")
    return path


def jpeg_crc_problem(data: bytes, recorded: int) -> str:
    """"" when a JPEG's bytes have the crc32 the shard writer recorded in the index, else why not: the one crc
    check of the reader (ShardIndex.read, and the streamed samples of pipeline/reader/stream.py)."""
    got = zlib.crc32(data)
    return "" if got == recorded else f".jpg crc32 {got} differs from the {recorded} recorded in the index"


def index_path(shard_dir: str | Path, split: str) -> Path:
    return Path(shard_dir) / f"{split}.index.npy"


def check_index_sha(data: bytes, sha256: str | None, source: str, fix: str) -> None:
    """The index file's bytes against the sha256 its manifest records (manifests of older versions record
    none): an index edited or swapped after sharding would give samples other labels or bytes."""
    if sha256 is not None and bytes_sha256(data) != sha256:
        raise ShardFormatError(f"{source}: sha256 differs from the one in the manifest (the index was changed or "
                               f"replaced after sharding); {fix} to rewrite it")


def load_index(shard_dir: str | Path, split: str, count: int, shards: int, sha256: str | None = None,
               num_classes: int | None = None) -> np.ndarray:
    """The rows of {split}.index.npy, checked against the manifest (its sha256 when given; labels below
    num_classes; ShardFormatError naming the file)."""
    import io

    path = index_path(shard_dir, split)
    if not path.is_file():
        raise MissingDataError(f"{path}: index file missing; rerun `kdpipe shard` with the same options to "
                               "write it (finished shards are kept)")
    try:
        data = path.read_bytes()
        rows = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # object arrays, a damaged header, a truncated file
        raise ShardFormatError(f"{path}: not a readable index ({' '.join(str(e).split())[:200]}); rerun "
                               "`kdpipe shard` with the same options to rewrite it") from None
    fix = "rerun `kdpipe shard` with the same options"
    rows = check_index_rows(rows, str(path), count, shards, fix, num_classes=num_classes)
    check_index_sha(data, sha256, str(path), fix)  # last: the messages above say more about a damaged file
    return rows


def check_index_rows(rows: np.ndarray, source: str, count: int, shards: int, fix: str, *,
                     num_classes: int | None = None) -> np.ndarray:
    """`rows` if they are a current index of `count` samples over `shards` shards (labels below `num_classes`,
    the manifest's class count; heights and widths >= 1), else a ShardFormatError naming `source`, the first
    sample at fault, and saying how to `fix` it (the one rule for local and remote indexes)."""
    if rows.dtype == INDEX_DTYPE_NO_CRC:
        raise ShardFormatError(f"{source}: written by an older kdpipe, without the crc32 field; {fix}: it adds the "
                               "field (only the index files are rewritten)")
    if rows.dtype != INDEX_DTYPE or rows.ndim != 1 or len(rows) != count:
        raise ShardFormatError(f"{source}: expected {count} rows of {INDEX_DTYPE}, found shape {rows.shape} of "
                               f"{rows.dtype}; {fix} to rewrite it")
    if len(rows) and (rows["shard"].min() < 0 or rows["shard"].max() >= shards or rows["offset"].min() < 0
                      or rows["size"].min() < 0):
        raise ShardFormatError(f"{source}: rows point outside the {shards} shards of the manifest; {fix} to "
                               "rewrite it")
    top = np.iinfo(np.int32).max if num_classes is None else num_classes
    outside = f"outside 0..{top - 1} (the manifest's {num_classes} classes)" if num_classes else "negative"
    checks = (("label", (rows["label"] < 0) | (rows["label"] >= top), outside),
              ("height", rows["height"] < 1, "below 1 pixel"), ("width", rows["width"] < 1, "below 1 pixel"))
    for field, bad, why in checks:
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ShardFormatError(f"{source}: sample {first} has {field} {int(rows[field][first])}, {why} "
                                   f"({int(bad.sum())} such rows); {fix} to rewrite it")
    return rows


class IndexRows:
    """What every index tells about its samples, by sample id (needs `rows` and `classes`)."""

    rows: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> np.ndarray:
        return self.rows["label"]

    @property
    def heights(self) -> np.ndarray:
        return self.rows["height"]

    @property
    def widths(self) -> np.ndarray:
        return self.rows["width"]


class ShardIndex(IndexRows):
    """Random access to one split of a shard directory.

    idx.labels / heights / widths are numpy arrays by sample id; idx.read(id) returns the JPEG bytes, checked
    against the crc32 the shard writer recorded when check_crc (the default: it costs about 1 % of a training
    view; docs/loader.md "Bad input").
    """

    def __init__(self, shard_dir: str | Path, split: str = "train", *, check_crc: bool = True):
        self.shard_dir = Path(shard_dir)
        self.split = split
        self.check_crc = check_crc
        self.manifest = read_manifest(self.shard_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise MissingDataError(f"{self.shard_dir}: no {split!r} split (it has: {', '.join(splits) or 'none'}); "
                                   f"`kdpipe shard` writes val only from a tree with a val/ folder")
        info = splits[split]
        self.shard_names: list[str] = [s["name"] for s in info["shards"]]
        source = str(self.shard_dir / MANIFEST)
        self._paths = [shard_file(self.shard_dir, n, f"{source}: splits.{split}") for n in self.shard_names]
        self.rows: np.ndarray = load_index(self.shard_dir, split, info["count"], len(self.shard_names),
                                          info.get("index_sha256"), num_classes=len(self.manifest["classes"]))
        self.classes: list[str] = [c["wnid"] for c in self.manifest["classes"]]
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def shard_path(self, sample_id: int) -> Path:
        return self._paths[int(self.rows["shard"][self._check_id(sample_id)])]

    # -- data
    def read(self, sample_id: int) -> bytes:
        """The JPEG bytes of one sample (one pread; the shard is opened once per process).

        With check_crc, bytes that differ from what the shard writer wrote raise CorruptSampleError: a flipped
        byte in a JPEG's entropy data still decodes, to wrong pixels, so decoding alone would not notice."""
        i = self._check_id(sample_id)
        shard, offset, size = int(self.rows["shard"][i]), int(self.rows["offset"][i]), int(self.rows["size"][i])
        data = os.pread(self._fd(shard, i), size, offset)
        if len(data) != size:
            raise OSError(f"{self._paths[shard]}: shorter than the index says "
                          f"(sample {i}: wanted {size} bytes at offset {offset}, got {len(data)})")
        if self.check_crc and jpeg_crc_problem(data, int(self.rows["crc32"][i])):
            raise CorruptSampleError(
                f"{self.split} sample {i} in shard {self._paths[shard]}: its JPEG bytes fail their crc32 check "
                f"(the shard changed after `kdpipe shard` wrote it); `kdpipe verify --shards {self.shard_dir}` lists "
                "every damaged sample; skip_corrupt=True (--skip-corrupt) drops such samples")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _check_id(self, sample_id: int) -> int:
        i = int(sample_id)
        if not 0 <= i < len(self.rows):
            raise IndexError(f"{self.shard_dir} {self.split}: sample id {i} out of range [0, {len(self.rows)})")
        return i

    def _fd(self, shard: int, sample_id: int) -> int:
        if self._pid != os.getpid():  # forked: descriptors belong to the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            path = self._paths[shard]
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise MissingDataError(f"{path}: shard missing (needed for {self.split} sample {sample_id})") from None
            self._fds[shard] = fd
        return fd

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            self.close()


def manifest_sha256(shard_dir: str | Path) -> str:
    """sha256 of manifest.json: identifies a shard set (teacher-cache fingerprints use it). A URL's manifest
    has the same sha256 as the directory it was copied from, so caches work across both."""
    if is_url(shard_dir):
        return fetch_manifest(shard_dir)[1]
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise MissingDataError(f"{path}: no manifest")
    return file_sha256(path)


# ----------------------------------------------------------------------- behind a URL


@lru_cache(maxsize=8)
def _manifest_bytes(base: str) -> tuple[bytes, str]:
    url = member_url(base, "manifest.json")
    raw = read_whole(url)
    return raw, bytes_sha256(raw)


def fetch_manifest(base: str) -> tuple[dict, str]:
    """(manifest, sha256 of its bytes) of the shard directory at `base`, fetched once per process (each call
    parses its own copy), checked like a local one (`pipeline.reader.index.check_manifest`: structure, dense ids, and
    shard names that are plain file names, so none can climb out of the URL)."""
    url = member_url(base, "manifest.json")
    raw, sha = _manifest_bytes(base)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ShardFormatError(f"{url}: not valid JSON ({type(e).__name__}: {one_line(e, 200)}); is {base} a "
                               f"kdpipe shard directory?") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "kdpipe-shards":
        raise ShardFormatError(f"{url}: not a kdpipe shard manifest")
    check_manifest(manifest, url)
    return manifest, sha


class RemoteIndex(IndexRows):
    """The metadata half of `ShardIndex` for a shard directory behind a URL (labels, heights, widths, classes,
    manifest), fetched once. There is no random access: samples come from `StreamBackend`."""

    def __init__(self, base: str, split: str = "train"):
        self.shard_dir, self.split = base, split
        self.manifest, self.manifest_sha256 = fetch_manifest(base)
        if split not in self.manifest.get("splits", {}):
            raise MissingDataError(f"{base}: no split {split!r} (has {', '.join(self.manifest.get('splits', {}))})")
        info = self.manifest["splits"][split]
        self.shards: list[dict] = info["shards"]
        self.shard_names = [s["name"] for s in self.shards]
        url = member_url(base, f"{split}.index.npy")
        try:
            data = read_whole(url)
            self.rows: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as e:
            raise ShardFormatError(f"{url}: not a kdpipe index ({one_line(e, 200)})") from None
        check_index_rows(self.rows, url, info["count"], len(self.shards),
                         "rerun `kdpipe shard` with the same options on the source and upload the new index files",
                         num_classes=len(self.manifest["classes"]))
        check_index_sha(data, info.get("index_sha256"), url, "upload the shard directory again, whole")
        for k, s in enumerate(self.shards):
            if not np.all(self.rows["shard"][s["first_id"]:s["first_id"] + s["count"]] == k):
                raise ShardFormatError(f"{url}: rows of {s['name']} do not point at it; the index and the "
                                       f"manifest disagree")
        self.classes: list[str] = [c["wnid"] for c in self.manifest["classes"]]

    def shard_url(self, k: int) -> str:
        return member_url(self.shard_dir, self.shard_names[k])

    def shard_path(self, sample_id: int) -> str:
        return self.shard_url(int(self.rows["shard"][int(sample_id)]))

    def read(self, sample_id: int) -> bytes:
        raise ConfigError(f"{self.shard_dir}: streamed shards are read in order, not by id; "
                          f"use ImageNet100Loader over the URL")
