"""What the loader's per-image crc32 check costs, against the per-image time of a training view.

    python tools/bench_crc.py                      # 64 ImageNet-sized (500x375, ~105 KB) JPEGs, 224 crops
    python tools/bench_crc.py --images 128 --rounds 7 --size 224

One core, one process, the same bytes for both: per round, the mean time of `zlib.crc32(jpeg)` and of the
whole CPU training view as a DataLoader worker builds it (read from a shard by `ShardIndex.read` without
the check, decode, crop + resize, colour, flip: `pipeline.backends.torch_backend.read_and_decode` +
`train_view`), and of `ShardIndex.read` with and without the check. Rounds alternate; medians are printed.
The issue's rule: under 3 % of the per-image time -> the check is on by default in training.
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=224, help="training crop")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from pipeline.augment import AugSpec, sample_params
    from pipeline.backends.torch_backend import read_and_decode, train_view
    from pipeline.index import ShardIndex
    from pipeline.shards import ShardOptions, build_shards
    from pipeline.synthetic import make_imagenet_tree

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
            "view": lambda i: train_view(read_and_decode(plain, i), p, i, args.size, out),
        }
        for fn in stages.values():  # warm-up: page cache, decoder, allocator
            per_image(fn)
        times: dict[str, list[float]] = {k: [] for k in stages}
        for _ in range(args.rounds):
            for name, fn in stages.items():
                times[name].append(per_image(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    mean_kb = sum(map(len, datas)) / len(datas) / 1024
    share = med["crc32"] / med["view"]
    print(f"{len(datas)} JPEGs, 500x375, mean {mean_kb:.0f} KiB; crop {args.size}; one thread; "
          f"load {os.getloadavg()[0]:.2f}; medians of {args.rounds} rounds")
    for name, t in med.items():
        print(f"  {name:<11} {t * 1e6:8.1f} us/img")
    print(f"crc32 / training view = {100 * share:.2f} %  (ShardIndex.read with / without the check: "
          f"+{(med['read+check'] - med['read']) * 1e6:.1f} us)")
    return {"share": share, **{k: v for k, v in med.items()}}


if __name__ == "__main__":
    main()
