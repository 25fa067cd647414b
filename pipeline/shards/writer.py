"""Writing ImageNet shards: WebDataset tars + DALI indexes + random-access index + manifest.

How a run works: the split's file list is ordered (train: seeded shuffle of the path-sorted list;
val: sorted by label then path); shard k takes list positions [k*S, (k+1)*S). Worker processes read
and prepare images (`image.prepare_image`) in order with bounded in-flight work; this process
writes each shard sequentially to a temp name, fsyncs and renames it, then writes a small sidecar
(`.kdpipe-shard/<shard>.json`: count, bytes, sha256, index rows, rejections). Resume finds finished
shards by their sidecars, so a killed run (kill -9 included) rewrites only what is missing and ends
with byte-identical shards and manifest. Format: docs/CONTRACTS.md.
"""
from __future__ import annotations

import json
import os
import re
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.core.version import __version__
from pipeline.core.classes import load_class_list, wnid_names
from pipeline.sources.imagenet import ImageNetTree, SourceFile, discover
from pipeline.core.atomic import atomic_write_bytes, atomic_write_json
from pipeline.core.errors import ConfigError, OptionsMismatch
from pipeline.core.locks import exclusive_lock
from pipeline.core.log import get_logger
from pipeline.core.progress import progress_bar
from pipeline.core.names import tsv_text
from pipeline.core.outdir import check_claimable, refuse_inside
from pipeline.shards.options import ShardOptions
from pipeline.reader.index import INDEX_DTYPE, MANIFEST, index_path, manifest_sha256, read_manifest
from pipeline.shards.image import Prepared, changed_source, prepare_many
from pipeline.core.digest import bytes_sha256, file_sha256
from pipeline.core.procs import ordered_map, usable_cores
from pipeline.shards.tar_io import HashProcess, TarShardWriter, dali_index_text

logger = get_logger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val")
STATE_DIR = ".kdpipe-shard"  # plan.json + one sidecar per finished shard
ROW_FIELDS = ("offset", "size", "label", "height", "width", "crc32")  # a sidecar's index row per sample
PREPARE_CHUNK = 64  # files per message to a worker (fewer wake-ups of the writer: a few % faster than 16)
OUR_FILES = re.compile(r"^\.?((train|val)-\d{6}\.(tar|idx)|(train|val)\.index\.npy|manifest\.json|rejected\.tsv)"
                       r"(\.tmp)?$")

__all__ = ["ShardOptions", "ShardReport", "OptionsMismatch", "build_shards", "read_manifest", "manifest_sha256",
           "verify_shards", "shard_name"]


@dataclass
class ShardReport:
    """What a run did: the manifest, rejected files, and which shards it wrote or found finished."""

    out: Path
    manifest: dict
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (split, source, reason)
    written: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    changed: list[tuple[str, str]] = field(default_factory=list)  # (shard written again, a source that changed)
    shifted: list[str] = field(default_factory=list)  # first shard written again because the ids before it shifted


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def ordered_files(files: Sequence[SourceFile], split: str, seed: int) -> list[SourceFile]:
    """Train: seeded global shuffle of the path-sorted list (class-mixed shards); val: by label, then path."""
    if split == "train":
        base = sorted(files, key=lambda f: f.rel)
        return [base[i] for i in np.random.default_rng(seed).permutation(len(base))]
    return sorted(files, key=lambda f: (f.label, f.rel))


def sample_members(sample_id: int, src: SourceFile, img: Prepared, jpg: bytes) -> list[tuple[str, bytes]]:
    """The four members of one sample, in the contract's order. The .json carries the JPEG's crc32
    so `verify` can name a sample whose bytes changed even when it still decodes."""
    key = f"{sample_id:08d}"
    # what json.dumps(..., sort_keys=True, separators=(",", ":")) gives, formatted directly (hot path; tested)
    meta = (f'{{"height":{img.height},"id":{sample_id},"jpg_crc32":{img.crc32},"label":{src.label},'
            f'"source":{json.dumps(src.rel)},"width":{img.width},"wnid":{json.dumps(src.wnid)}}}')
    return [(f"{key}.jpg", jpg), (f"{key}.cls", str(src.label).encode()), (f"{key}.json", meta.encode()),
            (f"{key}.i64", struct.pack("<q", sample_id))]


# ------------------------------------------------------------------------------ plan and resume


def make_plan(tree: ImageNetTree, opts: ShardOptions) -> dict:
    """What the output must be made from; a rerun must match it exactly to resume."""
    plan = {"format_version": FORMAT_VERSION, "options": asdict(opts), "classes": tree.classes,
            "inputs": {s: {"files": len(f), "list_sha256": tree.fingerprint(s)} for s, f in tree.splits.items()}}
    if tree.dataset is not None:  # a class-folder tree; ImageNet plans (and manifests) keep their old bytes
        plan["dataset"] = tree.dataset
    return plan


def plan_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two plans (empty when equal)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in plan_diff(a, b)]
        elif key == "classes" and isinstance(a, list) and isinstance(b, list):
            out.append(f"classes: {len(a)} -> {len(b)} wnids ({len(set(a) ^ set(b))} differ)")
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def remove_our_files(out: Path) -> None:
    """--overwrite: delete only files this tool writes (never anything else in the directory)."""
    for entry in os.scandir(out):
        if entry.is_file() and OUR_FILES.match(entry.name):
            os.unlink(entry.path)
    state = out / STATE_DIR
    if state.is_dir():
        for entry in os.scandir(state):
            if entry.is_file() and (entry.name.endswith(".json") or entry.name.endswith(".tmp")):
                os.unlink(entry.path)


def check_plan(out: Path, plan: dict, overwrite: bool) -> None:
    """Compare with the plan of an earlier run; on mismatch raise, or clean up with overwrite."""
    plan_file = out / STATE_DIR / "plan.json"
    old = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    if old is None and (out / MANIFEST).is_file():
        m = read_manifest(out)
        old = {"format_version": m["format_version"], "options": m["options"],
               "classes": [c["wnid"] for c in m["classes"]], "inputs": m["inputs"],
               **({"dataset": m["dataset"]} if "dataset" in m else {})}
    if old is None and not overwrite:
        foreign = sorted(e.name for e in os.scandir(out) if e.is_file() and OUR_FILES.match(e.name))
        if foreign:
            raise OptionsMismatch(f"{out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} "
                                  f"but no record of how they were made ({STATE_DIR}/plan.json); "
                                  "use an empty --out, or --overwrite to replace them")
    if old is not None and old != plan:
        if not overwrite:
            raise OptionsMismatch(f"{out} was written with different options or inputs: "
                                  f"{'; '.join(plan_diff(old, plan))}. Use another --out, or --overwrite to replace it")
        remove_our_files(out)
    elif overwrite:
        remove_our_files(out)
    elif old is not None and plan_file.is_file():
        return  # same plan: a rerun touches nothing it does not have to
    atomic_write_json(plan_file, plan)


def load_sidecar(out: Path, name: str, positions: tuple[int, int]) -> dict | None:
    """A finished shard's sidecar, if the shard on disk still matches it (cheap: size, no hashing)."""
    side = out / STATE_DIR / f"{name}.json"
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except ValueError:  # unreadable sidecar: the shard is simply written again
        return None
    tar, idx = out / name, out / name.replace(".tar", ".idx")
    if tuple(meta["positions"]) != positions or not tar.is_file() or tar.stat().st_size != meta["bytes"] \
            or not idx.is_file():
        return None
    if meta["rows"] and len(meta["rows"][0]) == len(ROW_FIELDS) - 1:  # written before the crc32 column
        crcs = jpg_crcs(tar)
        if crcs is None or len(crcs) != len(meta["rows"]):
            return None  # unreadable: the shard is written again
        meta["rows"] = [row + [crc] for row, crc in zip(meta["rows"], crcs)]
        atomic_write_json(side, meta)
    return meta


def jpg_crcs(tar: Path) -> list[int] | None:
    """The `jpg_crc32` recorded in each sample's .json, in order (None if the tar or a .json is unreadable).

    How a shard written before the index had a crc32 field gets one without being rewritten: the value
    recorded at writing time, not one computed from today's (possibly damaged) bytes."""
    import tarfile

    out = []
    try:
        with tarfile.open(tar, mode="r:") as f:
            for m in f:
                if m.name.endswith(".json"):
                    out.append(int(json.loads(f.extractfile(m).read())["jpg_crc32"]))
    except (tarfile.TarError, OSError, EOFError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return out


# ------------------------------------------------------------------------------------ writing


def image_bytes(path: str, img: Prepared) -> bytes | None:
    """The bytes that go into the shard: re-encoded ones, or the file itself (read here, page-cache hot
    from the worker's read, so images never travel through a pipe). None if the file changed meanwhile.
    (A kernel-side copy_file_range into the tar was measured too: ~10 % more CPU here, two syscalls more
    per sample; docs/shards.md.)"""
    if img.data is not None:
        return img.data
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # removed or made unreadable since the worker read it: rejected like a changed file
        return None
    try:
        data = os.read(fd, img.size + 1)  # one more byte than expected: a grown file shows up as a mismatch
    finally:
        os.close(fd)
    return data if len(data) == img.size else None


def write_shard(out: Path, root: Path, name: str, first_id: int, files: Sequence[SourceFile],
                images: Iterator[Prepared], positions: tuple[int, int],
                hasher: Callable[[Path], str] = file_sha256) -> tuple[int, Callable[[], dict]]:
    """Write one shard's samples from the next len(files) prepared images.

    Returns the sample count and a `finish` callable (hash, fsync, rename, DALI index, sidecar) that
    the caller runs in a thread, so the next shard's writing overlaps this one's fsync.
    """
    writer = TarShardWriter(out / name, hasher)
    rows, rejected, stamps, reencoded, sid = [], [], [], 0, first_id
    root_dir = os.path.join(str(root), "")  # plain strings: pathlib cost ~60 us an image here
    try:
        for src in files:
            img = next(images)
            stamps.append(list(img.source))
            jpg = None if img.reason else image_bytes(root_dir + src.rel, img)
            if jpg is None:
                rejected.append([src.rel, img.reason or "file changed or vanished while sharding"])
                continue
            offset = writer.add_sample(sample_members(sid, src, img, jpg))[0]
            rows.append([offset, img.size, src.label, img.height, img.width, img.crc32])
            reencoded += bool(img.reencoded)
            sid += 1
    except BaseException:
        writer.abort()
        raise

    def finish() -> dict:
        try:
            nbytes, sha = writer.close()
        except BaseException:
            writer.abort()
            raise
        atomic_write_bytes(out / name.replace(".tar", ".idx"), dali_index_text(writer.members).encode())
        meta = {"name": name, "first_id": first_id, "count": len(rows), "bytes": nbytes, "sha256": sha,
                "positions": list(positions), "rows": rows, "rejected": rejected, "reencoded": reencoded,
                "sources": stamps}
        atomic_write_json(out / STATE_DIR / f"{name}.json", meta)  # last: marks the shard finished
        return _compact(meta)

    return len(rows), finish


def build_split(tree: ImageNetTree, out: Path, split: str, opts: ShardOptions, workers: int,
                progress: bool, report: ShardReport, hasher: Callable[[Path], str] = file_sha256) -> list[dict]:
    """Write (or find finished) every shard of one split; returns their sidecars in order.

    A finished shard whose sources changed is written again; if that changes how many samples it holds, the
    finished shards after it would carry the wrong ids, so a second pass writes them again too (found on the
    first that no longer lines up, before anything of it is touched)."""
    files = ordered_files(tree.splits[split], split, opts.seed)
    size = opts.shard_size
    spans = [(k, (k * size, min(len(files), (k + 1) * size))) for k in range((len(files) + size - 1) // size)]
    root_dir = os.path.join(str(tree.root), "")
    written: set[str] = set()
    stale_from = len(spans)  # shards from this one on hold ids that shifted: written again
    while True:
        done = {k: load_sidecar(out, shard_name(split, k), span) if k < stale_from else None for k, span in spans}
        for k, (a, b) in spans:  # a source that changed since its shard was written: the shard is written again
            if done[k] is not None and (rel := changed_source(done[k].get("sources"), root_dir,
                                                              [f.rel for f in files[a:b]])) is not None:
                report.changed.append((shard_name(split, k), rel))
                done[k] = None
        metas, shifted = _write_pass(out, tree, split, files, spans, done, root_dir, opts, workers, progress,
                                     hasher, written)
        if shifted is None:
            break
        report.shifted.append(shard_name(split, shifted))
        stale_from = shifted
    names = [shard_name(split, k) for k, _ in spans]
    report.written += [n for n in names if n in written]
    report.reused += [n for n in names if n not in written]
    return metas


def _write_pass(out: Path, tree: ImageNetTree, split: str, files: list[SourceFile], spans: list, done: dict,
                root_dir: str, opts: ShardOptions, workers: int, progress: bool, hasher: Callable[[Path], str],
                written: set[str]) -> tuple[list[dict], int | None]:
    """One pass over the shards: (their sidecars, None), or (partial, k) where finished shard k's first id no
    longer follows the shards before it (nothing of shard k or later is written then)."""
    todo = [f for k, (a, b) in spans if done[k] is None for f in files[a:b]]
    logger.debug(f"shard {split}: {len(files)} files in {len(spans)} shards, {len(todo)} to write, {workers} workers")
    work = partial(prepare_many, quality=opts.quality, max_side=opts.max_side)
    paths = (root_dir + f.rel for f in todo)
    bar = progress_bar(total=len(todo), desc=f"shard {split}", unit="img", enabled=progress and bool(todo),
                       dynamic_ncols=True, smoothing=0.05)
    stream = ordered_map(work, paths, workers, chunk=PREPARE_CHUNK)
    images = _counting(stream, bar)
    finisher = ThreadPoolExecutor(1, thread_name_prefix="shard-finish")
    metas: list[dict | Future] = []
    next_id, shifted = 0, None
    try:
        for k, span in spans:
            name, meta = shard_name(split, k), done[k]
            if meta is not None and meta["first_id"] != next_id:
                logger.debug(f"{out / name}: first id {meta['first_id']} on disk, {next_id} now: the samples before "
                            "it changed count, so it and the shards after it are written again")
                shifted = k
                break
            if meta is not None:
                metas.append(_compact(meta))
                next_id += meta["count"]
                continue
            count, finish = write_shard(out, tree.root, name, next_id, files[span[0]:span[1]], images, span,
                                        hasher)
            metas.append(finisher.submit(finish))
            written.add(name)
            next_id += count
    finally:
        finisher.shutdown(wait=True)  # a started shard is always finished (or its temp file removed)
        images.close()
        stream.close()  # stops the worker pool if a write failed
        bar.close()
    return [m.result() if isinstance(m, Future) else m for m in metas], shifted


def _compact(meta: dict) -> dict:
    """Index rows as one int64 array per shard (~48 bytes a sample, not ~200 as Python lists)."""
    return {**{k: v for k, v in meta.items() if k != "sources"},
            "rows": np.asarray(meta["rows"], dtype=np.int64).reshape(-1, len(ROW_FIELDS))}


def _counting(it: Iterator[Prepared], bar) -> Iterator[Prepared]:
    for x in it:
        bar.update(1)
        yield x


def build_shards(imagenet: str | Path | ImageNetTree, out: str | Path, *,
                 classes: Sequence[str] | str | Path | None = None, val_labels: str | Path | None = None,
                 options: ShardOptions = ShardOptions(), workers: int | None = None, overwrite: bool = False,
                 progress: bool = True) -> ShardReport:
    """Shard an ImageNet tree into `out`; resumes an interrupted run and only checks a finished one.

    imagenet: the tree's root, or a tree already discovered (e.g. `pipeline.sources.imagefolder.discover_imagefolder`
    for any class-folder dataset; then classes and val_labels must be None).
    classes: wnids, a class-list file, or None for the canonical ImageNet-100 list.
    Raises OptionsMismatch when `out` holds shards made differently (unless overwrite).
    """
    if options.shard_size < 1 or not 1 <= options.quality <= 100 or (options.max_side or 1) < 1:
        raise ConfigError(f"invalid shard options: {options}")
    if isinstance(imagenet, ImageNetTree):
        if classes is not None or val_labels is not None:
            raise ConfigError("classes and val_labels select from an ImageNet tree; a discovered tree has its own")
        tree = imagenet
    else:
        wnids = list(classes) if isinstance(classes, (list, tuple)) else load_class_list(classes)
        tree = discover(imagenet, wnids, val_labels)
    out = Path(out)
    refuse_inside(out, [("the source tree", tree.root)])
    check_claimable(out, STATE_DIR, "shards", legacy=_holds_only_shards)  # never into a directory of other files
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    workers = workers or usable_cores()
    with exclusive_lock(out / STATE_DIR / "lock", f"shard directory {out} (another `kdpipe shard` writes it)"):
        plan = make_plan(tree, options)
        check_plan(out, plan, overwrite)
        report = ShardReport(out=out, manifest={})
        hasher = HashProcess() if workers > 1 else None  # forked now, from this thread (see HashProcess)
        try:
            metas = {s: build_split(tree, out, s, options, workers, progress, report, hasher or file_sha256)
                     for s in SPLITS if s in tree.splits}
        finally:
            if hasher is not None:
                hasher.close()
        report.manifest = finish(out, tree, plan, metas, report)
    return report


def _holds_only_shards(out: Path) -> bool:
    """An output of an older kdpipe (no state directory): a manifest, or only files this tool writes."""
    return (out / MANIFEST).is_file() or all(OUR_FILES.match(e.name) for e in os.scandir(out))


def finish(out: Path, tree: ImageNetTree, plan: dict, metas: dict[str, list[dict]], report: ShardReport) -> dict:
    """Index files, rejected.tsv and manifest from the sidecars (identical bytes however the run went)."""
    index_sha: dict[str, str] = {}  # the manifest covers the index files too (checked when an index is loaded)
    for split, shards in metas.items():
        arr = np.zeros(sum(m["count"] for m in shards), INDEX_DTYPE)
        for k, m in enumerate(shards):
            rows = np.asarray(m["rows"], dtype=np.int64).reshape(-1, len(ROW_FIELDS))
            part = arr[m["first_id"]: m["first_id"] + m["count"]]
            part["shard"] = k
            for j, column in enumerate(ROW_FIELDS):
                part[column] = rows[:, j]
        data = _npy_bytes(arr)
        _write_if_changed(index_path(out, split), data)
        index_sha[split] = bytes_sha256(data)
        found = [(s, src, reason) for s, src, reason in tree.rejected if s == split]  # by discovery, if any
        report.rejected += found + [(split, src, reason) for m in shards for src, reason in m["rejected"]]
    tsv = tsv_text(("split", "source", "reason"), report.rejected)  # names escaped: pipeline/core/names.py
    _write_if_changed(out / "rejected.tsv", tsv.encode("utf-8"))
    manifest = {
        "format": "kdpipe-shards", "format_version": FORMAT_VERSION, "kdpipe_version": __version__,
        "classes": manifest_classes(tree),
        "splits": {split: {"count": sum(m["count"] for m in shards),
                           "rejected": sum(len(m["rejected"]) for m in shards) +
                           sum(s == split for s, _, _ in tree.rejected),
                           "reencoded": sum(m["reencoded"] for m in shards), "index_sha256": index_sha[split],
                           "shards": [{k: m[k] for k in ("name", "first_id", "count", "bytes", "sha256")}
                                      for m in shards]}
                   for split, shards in metas.items()},
        "options": plan["options"], "inputs": plan["inputs"], "rejected": len(report.rejected)}
    if "dataset" in plan:
        manifest["dataset"] = plan["dataset"]
    atomic_write_json(out / MANIFEST, manifest, keep_same=True)
    return manifest


def manifest_classes(tree: ImageNetTree) -> list[dict]:
    """The manifest's class list: label, class id ("wnid": an ImageNet wnid or a class folder's name) and a
    human-readable name (ImageNet's for wnids it knows; a class folder's own name otherwise)."""
    names = wnid_names()
    default = (lambda c: c) if tree.dataset is not None else (lambda c: "")
    return [{"label": i, "wnid": c, "name": names.get(c, default(c))} for i, c in enumerate(tree.classes)]


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    """A rerun over a finished output leaves every file untouched."""
    atomic_write_bytes(path, data, keep_same=True)


def verify_shards(shard_dir: str | Path, workers: int | None = None, progress: bool = False):
    """Check every shard against the manifest; see pipeline.shards.verify."""
    from pipeline.shards.verify import verify_shards as _verify

    return _verify(shard_dir, workers=workers, progress=progress)
