"""What the integrity checks cost, each against the work it guards (one core, one process, rounds alternate,
medians printed):

1. the loader's per-image crc32 check (`ShardIndex.read` with check_crc) against the per-image time of a CPU
   training view as a DataLoader worker builds it (read, decode, crop + resize, colour, flip: `read_and_decode`
   + `train_view`), on ImageNet-sized (500x375, ~105 KB) JPEGs. The issue's rule: under 3 % -> on by default.
2. the teacher cache's per-unit checksums on loading an epoch slice (ImageNet-100's shape: 126,689 samples x
   100 classes, float16, 31 chunks of 4096): the checked load against plain zarr reads of the same arrays.

    python tools/bench_integrity.py                      # both
    python tools/bench_integrity.py --images 128 --rounds 7 --only jpeg
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]


def bench_jpeg(args) -> dict:
    """Per-image crc32 vs the training view (part 1)."""
    from pipeline.core.augment import AugSpec, sample_params
    from pipeline.reader.backends.cpu_views import crop_box, decode_region, view_from_crop
    from pipeline.reader.index import ShardIndex
    from pipeline.shards.writer import ShardOptions, build_shards
    from pipeline.sources.synthetic import make_imagenet_tree

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        per_class = -(-args.images // len(WNIDS))
        make_imagenet_tree(root / "tree", WNIDS, train_per_class=per_class, val_per_class=0, val_layout=None,
                           size=(375, 500))
        build_shards(root / "tree", root / "shards", classes=WNIDS, options=ShardOptions(shard_size=256),
                     workers=1, progress=False)
        plain = ShardIndex(root / "shards", "train", check_crc=False)
        checked = ShardIndex(root / "shards", "train", check_crc=True)
        ids = np.arange(len(plain), dtype=np.int64)
        datas = [plain.read(i) for i in ids]
        spec = AugSpec(image_size=args.size)
        p = sample_params(spec, 0, 0, ids, plain.heights[ids], plain.widths[ids])
        out = np.empty((args.size, args.size, 3), np.uint8)

        def per_image(fn) -> float:
            t = time.perf_counter()
            for i in ids.tolist():
                fn(i)
            return (time.perf_counter() - t) / len(ids)

        stages = {
            "crc32": lambda i: zlib.crc32(datas[i]),
            "read": lambda i: plain.read(i),
            "read+check": lambda i: checked.read(i),
            "view": lambda i: view_from_crop(decode_region(plain.read(i), (int(plain.heights[i]), int(plain.widths[i])),
                                                           crop_box(p, i)), p, i, args.size, out),
        }
        med = _rounds(stages, args.rounds, per_image)
    mean_kb = sum(map(len, datas)) / len(datas) / 1024
    share = (med["read+check"] - med["read"]) / med["view"]
    print(f"[jpeg] {len(datas)} JPEGs, 500x375, mean {mean_kb:.0f} KiB; crop {args.size}; "
          f"medians of {args.rounds} rounds")
    for name, t in med.items():
        print(f"[jpeg]   {name:<11} {t * 1e6:8.1f} us/img")
    print(f"[jpeg] the check (read+check - read) / training view = {100 * share:.2f} %  "
          f"(crc32 alone: {100 * med['crc32'] / med['view']:.2f} %)")
    return {"jpeg_share": share}


def bench_cache(args) -> dict:
    """Checked vs plain load of one epoch slice (part 2)."""
    from pipeline.cache.checks import check_epoch
    from pipeline.cache.store import CacheLayout, TeacherCacheWriter

    n, classes = 126_689, 100
    with tempfile.TemporaryDirectory() as tmp:
        lay = CacheLayout(epochs=1, num_samples=n, num_classes=classes)
        writer = TeacherCacheWriter.create(Path(tmp) / "c.zarr", lay, {"bench": True})
        rng = np.random.default_rng(0)
        for e, ch in lay.units():
            lo, hi = lay.id_range(ch)
            writer.write_unit(e, ch, rng.normal(0, 3, (hi - lo, classes)).astype(np.float32))
        g, done = writer.group, np.ones(lay.chunks_per_epoch, bool)

        def plain(_) -> float:
            t = time.perf_counter()
            np.asarray(g["logits"][0]), np.asarray(g["weight"][0])
            return time.perf_counter() - t

        def checked(_) -> float:
            t = time.perf_counter()
            assert not check_epoch(g, lay, 0, ("logits", "weight"), done)[1]
            return time.perf_counter() - t

        med = _rounds({"plain": plain, "checked": checked}, args.rounds, lambda fn: fn(None))
    mb = n * classes * 2 / 1e6
    print(f"[cache] epoch slice {n} x {classes} float16 ({mb:.0f} MB) + weight, {lay.chunks_per_epoch} chunks: "
          f"plain zarr load {med['plain'] * 1e3:.1f} ms, checked {med['checked'] * 1e3:.1f} ms "
          f"(+{(med['checked'] / med['plain'] - 1) * 100:.1f} %, once per epoch, prefetched in the background)")
    return {"cache_ratio": med["checked"] / med["plain"]}


def _rounds(stages: dict, rounds: int, measure) -> dict[str, float]:
    for fn in stages.values():  # warm-up: page cache, decoder, allocator
        measure(fn)
    times: dict[str, list[float]] = {k: [] for k in stages}
    for _ in range(rounds):
        for name, fn in stages.items():
            times[name].append(measure(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=224, help="training crop")
    ap.add_argument("--only", choices=["jpeg", "cache"], default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"one thread; load average {os.getloadavg()[0]:.2f}")
    out = {}
    if args.only in (None, "jpeg"):
        out |= bench_jpeg(args)
    if args.only in (None, "cache"):
        out |= bench_cache(args)
    return out


if __name__ == "__main__":
    main()
