"""Benchmark: DALI backend images/s against the torch backend and torchvision's ImageFolder + PIL.

All three run in this process, on the same images, cores and batch size, in alternating rounds (the
machine is shared and noisy: the median round counts). Training augmentation at --size (224 default):
crop + resize, flip, colour jitter 0.4/0.4/0.4, normalise to float32. Prints img/s per path and the
ratios against the torchvision reference and the torch backend, and names the machine.

    python tools/bench_dali.py                       # synthetic 500x375 JPEGs, built in a temp dir
    python tools/bench_dali.py --shards DIR --images 2048
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]


def machine() -> str:
    """CPU model and usable cores, plus the GPU if there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {len(os.sched_getaffinity(0))} usable cores, {gpu}"


def synth_shards(root: Path, per_class: int) -> tuple[Path, Path]:
    """A synthetic 500x375 ImageNet-like tree and its shards (what the benchmark reads)."""
    from pipeline.shards import ShardOptions, build_shards
    from pipeline.synthetic import make_imagenet_tree

    make_imagenet_tree(root / "tree", WNIDS, train_per_class=per_class, val_per_class=0, val_layout=None,
                       size=(375, 500), progress=True)
    build_shards(root / "tree", root / "shards", classes=WNIDS, options=ShardOptions(shard_size=256),
                 progress=False)
    return root / "tree", root / "shards"


def reference_loader(tree: Path, size: int, batch_size: int, workers: int):
    """What users would otherwise write: ImageFolder + PIL, RandomResizedCrop, flip, ColorJitter, Normalize."""
    from torchvision import datasets, transforms as T

    tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4),
                    T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = datasets.ImageFolder(str(tree / "train"), transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0, drop_last=False)


def time_round(batches, n_images: int) -> float:
    """Images/s over one pass of at least n_images (the first batch's start-up included)."""
    t0, seen = time.perf_counter(), 0
    for b in batches:
        seen += len(b[1])
        if seen >= n_images:
            break
    if seen < n_images:
        raise RuntimeError(f"expected {n_images} images, got {seen}")
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, help="shard directory (train split); default: synthesise")
    ap.add_argument("--tree", type=Path, help="the ImageNet tree of --shards, for the torchvision reference")
    ap.add_argument("--per-class", type=int, default=128, help="synthetic images per class (4 classes)")
    ap.add_argument("--images", type=int, default=512, help="images per round")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="threads/processes per path")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from pipeline.augment import AugSpec
    from pipeline.backends.dali_backend import DaliBackend
    from pipeline.backends.torch_backend import TorchBackend
    from pipeline.index import ShardIndex

    tmp = tempfile.TemporaryDirectory(prefix="bench_dali_")
    tree, shards = (args.tree, args.shards) if args.shards else synth_shards(Path(tmp.name), args.per_class)
    index = ShardIndex(shards, "train")
    n = min(args.images, len(index))
    spec = AugSpec(image_size=args.size)
    common = dict(spec=spec, seed=0, train=True, device=torch.device("cpu"), normalize=True,
                  dtype=torch.float32, num_workers=args.workers, skip_corrupt=False)
    backends = {"dali": DaliBackend(index, **common), "torch backend": TorchBackend(index, **common)}
    ref = reference_loader(tree, args.size, args.batch_size, args.workers) if tree else None
    ids = np.arange(n, dtype=np.int64)
    rates: dict[str, list[float]] = {k: [] for k in [*backends, *(["torchvision ImageFolder+PIL"] if ref else [])]}
    print(f"machine: {machine()}\n{n} images of {shards} per round, batch {args.batch_size}, output {args.size}, "
          f"{args.workers} workers/threads, {args.rounds} rounds (+1 warm-up)")
    for r in range(args.rounds + 1):
        for name, backend in backends.items():
            rate = time_round(backend.iter_batches(ids, r, args.batch_size), n)
            if r:  # round 0 warms up (worker start, first pipeline build)
                rates[name].append(rate)
        if ref is not None:
            rate = time_round(ref, n)
            if r:
                rates["torchvision ImageFolder+PIL"].append(rate)
    med = {k: statistics.median(v) for k, v in rates.items()}
    for k, v in rates.items():
        print(f"{k:30s} {med[k]:7.0f} img/s   rounds: {', '.join(f'{x:.0f}' for x in v)}")
    for base in [b for b in ("torchvision ImageFolder+PIL", "torch backend") if b in med]:
        print(f"dali / {base}: {med['dali'] / med[base]:.2f}x")


if __name__ == "__main__":
    main()
