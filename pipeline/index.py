"""Random access into shards: sample id -> (shard, offset, size, label, height, width), and the bytes.

`ShardIndex` is what loaders use from DataLoader worker processes: it pickles without open files
and opens each shard lazily, once per process, then reads an image with one `os.pread`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

# Row i describes sample id i of a split; `offset` is where the `.jpg` member's data starts in its tar.
INDEX_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("size", "<i8"), ("label", "<i4"),
                        ("height", "<i4"), ("width", "<i4")])
MANIFEST = "manifest.json"


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a shard directory (see docs/CONTRACTS.md), with a clear error if absent."""
    from .remote import fetch_manifest, is_url

    if is_url(shard_dir):  # fetched once per process, shard names checked (pipeline/remote.py)
        return fetch_manifest(shard_dir)[0]
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; is {shard_dir} a finished `kdpipe shard` output?")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "kdpipe-shards":
        raise ValueError(f"{path}: not a kdpipe shard manifest")
    return manifest


def index_path(shard_dir: str | Path, split: str) -> Path:
    return Path(shard_dir) / f"{split}.index.npy"


class ShardIndex:
    """Random access to one split of a shard directory.

    idx.labels / heights / widths are numpy arrays by sample id; idx.read(id) returns the JPEG bytes.
    """

    def __init__(self, shard_dir: str | Path, split: str = "train"):
        self.shard_dir = Path(shard_dir)
        self.split = split
        self.manifest = read_manifest(self.shard_dir)
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.shard_dir}: no split {split!r} (has {', '.join(self.manifest['splits'])})")
        info = self.manifest["splits"][split]
        self.shard_names: list[str] = [s["name"] for s in info["shards"]]
        path = index_path(self.shard_dir, split)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: index file missing")
        self.rows: np.ndarray = np.load(path, allow_pickle=False)
        if self.rows.dtype != INDEX_DTYPE or len(self.rows) != info["count"]:
            raise ValueError(f"{path}: expected {info['count']} rows of {INDEX_DTYPE}, "
                             f"found {len(self.rows)} of {self.rows.dtype}")
        self.classes: list[str] = [c["wnid"] for c in self.manifest["classes"]]
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    # -- metadata
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

    def shard_path(self, sample_id: int) -> Path:
        return self.shard_dir / self.shard_names[int(self.rows["shard"][self._check_id(sample_id)])]

    # -- data
    def read(self, sample_id: int) -> bytes:
        """The JPEG bytes of one sample (one pread; the shard is opened once per process)."""
        i = self._check_id(sample_id)
        shard, offset, size = int(self.rows["shard"][i]), int(self.rows["offset"][i]), int(self.rows["size"][i])
        data = os.pread(self._fd(shard, i), size, offset)
        if len(data) != size:
            raise OSError(f"{self.shard_dir / self.shard_names[shard]}: shorter than the index says "
                          f"(sample {i}: wanted {size} bytes at offset {offset}, got {len(data)})")
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
            path = self.shard_dir / self.shard_names[shard]
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: shard missing (needed for {self.split} sample {sample_id})") from None
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
