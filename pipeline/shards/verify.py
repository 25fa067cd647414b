"""`kdpipe verify`: check a shard directory against its manifest and index.

Per shard: present, size and sha256 as recorded; members in the contract's order with the expected
ids; every image decodes to RGB or greyscale with the recorded size and passes the acceptance rule of
`kdpipe shard` (`pipeline.shards.image.jpeg_problem`: baseline 8-bit, no EXIF rotation, within the pixel limit);
label, id, crc32 and JSON agree with the index; the DALI index matches the tar. Problems name the shard and
the sample id.

verify is the damage-diagnosis tool, so damage never stops it: a manifest it cannot use is one error
(MissingDataError, ShardFormatError naming the file); anything wrong below the manifest, a missing or
unreadable index, a shard name that leaves the directory, a .json nested beyond Python's recursion limit,
is a finding, and the check goes on with the rest.
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.errors import DataError, one_line
from pipeline.reader.index import MANIFEST, load_index, read_manifest, shard_file
from pipeline.shards.image import jpeg_frame, jpeg_problem
from pipeline.core.digest import file_sha256
from pipeline.core.procs import ordered_map, usable_cores
from pipeline.core.progress import progress_bar
from pipeline.shards.tar_io import dali_index_text

EXTS = ("jpg", "cls", "json", "i64")


@dataclass
class VerifyResult:
    """Outcome of verify_shards: ok when no problems; problems name shard and sample."""

    shard_dir: Path
    samples: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_sample(sid: int, parts: dict[str, tuple[int, bytes]], row: np.void | None) -> list[str]:
    """Problems with one sample's members (parts: ext -> (data offset, bytes)) against its index row
    (None when the index is unusable: then only the members are checked against each other)."""
    out = []
    if list(parts) != list(EXTS):
        return [f"sample {sid}: members {list(parts)}, expected {list(EXTS)}"]
    (off, jpg), cls, meta_raw, i64 = parts["jpg"], parts["cls"][1], parts["json"][1], parts["i64"][1]
    try:
        with Image.open(io.BytesIO(jpg)) as im:
            im.load()
            fmt, mode, (w, h) = im.format, im.mode, im.size
    except Exception as e:  # every decode failure is a finding, reported with the sample id
        return [f"sample {sid}: image does not decode ({' '.join(str(e).split())})"]
    if fmt != "JPEG" or mode not in ("RGB", "L"):
        out.append(f"sample {sid}: {fmt} {mode} image, expected RGB or greyscale JPEG")
    elif problem := jpeg_problem(jpeg_frame(jpg)):  # the rule `kdpipe shard` applies, so all backends agree
        out.append(f"sample {sid}: stored as a {problem}, which the backends read differently; "
                   "rewrite the shards with `kdpipe shard --overwrite` (it re-encodes such images)")
    crc = zlib.crc32(jpg)
    if row is not None:
        if (h, w) != (row["height"], row["width"]):
            out.append(f"sample {sid}: image is {h}x{w}, index says {row['height']}x{row['width']}")
        if (off, len(jpg)) != (row["offset"], row["size"]):
            out.append(f"sample {sid}: .jpg at offset {off} size {len(jpg)}, index says {row['offset']} {row['size']}")
        if cls != str(int(row["label"])).encode():
            out.append(f"sample {sid}: .cls {cls[:20]!r}, index label {row['label']}")
        if crc != row["crc32"]:
            out.append(f"sample {sid}: .jpg bytes differ from the crc32 in the index")
    if len(i64) != 8 or struct.unpack("<q", i64)[0] != sid:
        out.append(f"sample {sid}: .i64 does not hold its id")
    try:
        meta = json.loads(meta_raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; absurd nesting
        return out + [f"sample {sid}: .json unreadable ({type(e).__name__}: {one_line(e, 120)})"]
    if not isinstance(meta, dict):
        return out + [f"sample {sid}: .json is not an object"]
    if meta.get("jpg_crc32") != crc:
        out.append(f"sample {sid}: .jpg bytes differ from the checksum in its .json")
    want = {"id": sid, "height": h, "width": w, **({"label": int(row["label"])} if row is not None else {})}
    bad = [k for k, v in want.items() if meta.get(k) != v]
    if bad:
        out.append(f"sample {sid}: .json fields {bad} disagree")
    return out


def verify_shard(task: tuple[Path, dict, np.ndarray | None, int]) -> list[str]:
    """All problems of one shard (each prefixed with its file name); rows None: no usable index."""
    path, entry, rows, first_id = task
    name = path.name
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    if path.stat().st_size != entry["bytes"]:
        problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
    if file_sha256(path) != entry["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest")
    members: list[tuple[str, int, int]] = []
    samples: list[tuple[str, dict]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:  # read member data in order; nothing is extracted to disk
                if not m.isfile():
                    problems.append(f"{name}: unexpected non-file member {m.name!r}")
                    continue
                members.append((m.name, m.offset_data, m.size))
                key, _, ext = m.name.partition(".")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (m.offset_data, tar.extractfile(m).read())
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: unreadable tar after {len(samples)} samples ({e})")
    if len(samples) != entry["count"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry['count']}")
    for i, (key, parts) in enumerate(samples[: entry["count"]]):
        sid = first_id + i
        if key != f"{sid:08d}":
            problems.append(f"{name}: sample {sid}: key {key!r}, expected {sid:08d}")
            continue
        problems += [f"{name}: {p}" for p in check_sample(sid, parts, None if rows is None else rows[i])]
    idx = path.with_suffix(".idx")
    if not idx.is_file() or idx.read_text() != dali_index_text(members):
        problems.append(f"{name}: DALI index {idx.name} missing or out of date")
    return problems


def _verify_chunk(tasks: list) -> list[list[str]]:
    out = []
    for task in tasks:
        try:
            out.append(verify_shard(task))
        except Exception as e:  # damage nobody foresaw must not stop the diagnosis of the other shards
            out.append([f"{task[0].name}: could not be checked ({type(e).__name__}: {one_line(e, 200)})"])
    return out


def verify_shards(shard_dir: str | Path, workers: int | None = None, progress: bool = False) -> VerifyResult:
    """Check every shard of every split against manifest.json and the index files.

    Raises (MissingDataError, ShardFormatError) only when the manifest itself is missing or unusable."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    result = VerifyResult(shard_dir)
    tasks = []
    for split, info in manifest["splits"].items():
        try:
            rows = load_index(shard_dir, split, info["count"], len(info["shards"]), info.get("index_sha256"),
                              len(manifest["classes"]))
        except DataError as e:  # the shards are still checked against themselves and the manifest
            result.problems.append(one_line(e))
            rows = None
        for k, entry in enumerate(info["shards"]):
            try:
                path = shard_file(shard_dir, entry["name"], f"{shard_dir / MANIFEST}: splits.{split}.shards[{k}]")
            except DataError as e:
                result.problems.append(one_line(e))
                continue
            sl = None if rows is None else rows[entry["first_id"]: entry["first_id"] + entry["count"]]
            if sl is not None and len(sl) and (sl["shard"] != k).any():
                result.problems.append(f"{split}.index.npy: rows of {entry['name']} point at another shard")
            tasks.append((path, entry, sl, entry["first_id"]))
            result.samples += entry["count"]
    result.shards = len(tasks)
    results = ordered_map(_verify_chunk, tasks, workers or usable_cores(), chunk=1, window=2)
    for problems in progress_bar(results, total=len(tasks), desc="verify", unit="shard", enabled=progress):
        result.problems += problems
    return result
