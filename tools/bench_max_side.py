"""What `kdpipe shard --max-side` buys and costs, on the built-in learnable dataset (CPU, a few minutes).

    python tools/bench_max_side.py                       # 10 classes, 128 px stored, --max-side 80, 64 px crops
    python tools/bench_max_side.py --stored 160 --max-side 96 --crop 64 --epochs 6 --classes 20

One learnable tree is sharded twice: bytes passed through (stored size) and with --max-side N (every image
re-encoded at most N px on its longer side). Then, for both:
- the loader's training views per second (torch backend, uint8, the CPU workers), in alternating rounds;
- the validation top-1 of a short `kdpipe train --mode hard` run, same seed, same model, same crops.
The stored/crop proportion mirrors ImageNet at 224 (images of ~400 px, --max-side 256-320).
Then the same loader comparison at ImageNet's own scale (no training): --photos synthetic photo-like
500x375 JPEGs (~105 KB), 224 px views, bytes passed through vs --photo-max-side (default 320).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def loader_rate(shards: Path, crop: int, batch: int, workers: int, epoch: int) -> float:
    """Training views per second over one epoch, after the first batch of each worker."""
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader

    loader = ImageNet100Loader(shards, "train", batch, backend="torch", device="cpu", num_workers=workers,
                               spec=AugSpec(image_size=crop), normalize=False)
    loader.set_epoch(epoch)
    it = iter(loader)
    for _ in range(max(1, workers)):
        next(it)
    n, t0 = 0, time.perf_counter()
    for b in it:
        n += len(b)
    return n / (time.perf_counter() - t0)


def view_cpu_ms(shards: Path, crop: int, count: int = 256) -> float:
    """CPU ms (this thread) per training view of a worker's whole job: read, decode, crop, resize, colour."""
    import torch

    from pipeline.core.augment import AugSpec
    from pipeline.reader.backends.torch_backend import BatchBuilder
    from pipeline.reader.index import ShardIndex

    torch.set_num_threads(1)
    index = ShardIndex(shards, "train")
    ids = np.arange(min(count, len(index)))
    chunks = [ids[i:i + 64] for i in range(0, len(ids), 64)]
    builder = BatchBuilder(index, AugSpec(image_size=crop), 0, 0, True, chunks, False)
    builder[0]  # codec libraries load lazily
    t0 = time.thread_time()
    for k in range(len(chunks)):
        builder[k]
    return (time.thread_time() - t0) / len(ids) * 1e3


def train_top1(shards: Path, out: Path, args: argparse.Namespace) -> float:
    """Best validation top-1 (%) of a short hard-label run (the CLI, as a user would run it)."""
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--shards", str(shards), "--out", str(out), "--mode", "hard",
           "--students", args.model, "--epochs", str(args.epochs), "--batch-size", "64", "--lr", "0.05",
           "--image-size", str(args.crop), "--seed", "0", "--backend", "torch", "--device", "cpu",
           "--num-workers", str(args.workers), "--log-every", "1000"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return max(ln["s0"]["val_top1"] for ln in lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--train-per-class", type=int, default=120)
    ap.add_argument("--val-per-class", type=int, default=30)
    ap.add_argument("--stored", type=int, default=128, help="side of the generated images, px")
    ap.add_argument("--max-side", type=int, default=80, help="--max-side of the second shard set, px")
    ap.add_argument("--crop", type=int, default=64, help="training crop and validation view, px")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--model", default="tiny_resnet")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--photos", type=int, default=512, help="photo-sized images for the 224 px part (0: skip it)")
    ap.add_argument("--photo-max-side", type=int, default=320)
    args = ap.parse_args(argv)

    from pipeline.core.classes import imagenet100_wnids
    from pipeline.sources.learnable import make_learnable_tree
    from pipeline.shards.writer import ShardOptions, build_shards

    with tempfile.TemporaryDirectory(prefix="kdpipe-max-side-") as tmp:
        root = Path(tmp)
        wnids = imagenet100_wnids()[:args.classes]
        make_learnable_tree(root / "tree", wnids, train_per_class=args.train_per_class,
                            val_per_class=args.val_per_class, size=args.stored, seed=0)
        sets = {f"stored {args.stored} px": ShardOptions(shard_size=500),
                f"--max-side {args.max_side}": ShardOptions(shard_size=500, max_side=args.max_side)}
        dirs = {}
        for k, (name, opts) in enumerate(sets.items()):
            dirs[name] = root / f"shards{k}"
            t0 = time.perf_counter()
            build_shards(root / "tree", dirs[name], classes=wnids, options=opts, progress=False)
            mb = sum(f.stat().st_size for f in dirs[name].glob("train-*.tar")) / 1e6
            print(f"{name}: sharded in {time.perf_counter() - t0:.1f} s, train shards {mb:.1f} MB")
        rates: dict[str, list[float]] = {n: [] for n in dirs}
        for r in range(args.rounds):
            for name, d in dirs.items():
                rates[name].append(loader_rate(d, args.crop, 64, args.workers, r))
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in rates.items()) + " views/s")
        top1 = {name: train_top1(d, root / f"run{k}", args) for k, (name, d) in enumerate(dirs.items())}
        base = list(dirs)[0]
        for name in dirs:
            med = statistics.median(rates[name])
            paired = statistics.median(a / b for a, b in zip(rates[name], rates[base]))
            print(f"{name}: loader {med:.0f} views/s ({paired:.2f}x, median of per-round ratios); "
                  f"{args.model} {args.epochs} epochs, best val top-1 {top1[name]:.1f} %")
        print(f"({args.classes} classes x {args.train_per_class} train / {args.val_per_class} val, crops {args.crop} px, "
              f"seed 0, {args.workers} workers; load average {os.getloadavg()[0]:.1f})")
        if args.photos:
            photos(root / "photos", args)


def photos(root: Path, args: argparse.Namespace) -> None:
    """Loader views/s at 224 px on 500x375 photo-like JPEGs, passed through vs --photo-max-side."""
    from pipeline.shards.writer import ShardOptions, build_shards
    from pipeline.sources.synthetic import make_imagenet_tree

    wnids = ["n02869837", "n01749939", "n02488291", "n02107142"]
    make_imagenet_tree(root / "tree", wnids, train_per_class=-(-args.photos // 4), val_per_class=0, val_layout=None,
                       size=(375, 375, 500, 500))
    dirs = {"500x375 as they are": root / "pass", f"--max-side {args.photo_max_side}": root / "small"}
    for (name, d), side in zip(dirs.items(), (None, args.photo_max_side)):
        build_shards(root / "tree", d, classes=wnids, options=ShardOptions(shard_size=256, max_side=side),
                     progress=False)
    rates: dict[str, list[float]] = {n: [] for n in dirs}
    for r in range(args.rounds):
        for name, d in dirs.items():
            rates[name].append(loader_rate(d, 224, 64, args.workers, r))
        print(f"photos round {r + 1}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in rates.items()) + " views/s")
    base = list(dirs)[0]
    cpu = {name: min(view_cpu_ms(d, 224) for _ in range(3)) for name, d in dirs.items()}
    for name, d in dirs.items():
        mb = sum(f.stat().st_size for f in d.glob("train-*.tar")) / 1e6
        paired = statistics.median(a / b for a, b in zip(rates[name], rates[base]))
        print(f"photos, {name}: loader {statistics.median(rates[name]):.0f} views/s at 224 px ({paired:.2f}x, "
              f"median of per-round ratios); {cpu[name]:.2f} CPU ms a view in a worker "
              f"({cpu[base] / cpu[name]:.2f}x views per CPU second); train shards {mb:.0f} MB")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
