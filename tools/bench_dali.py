"""CPU cost per image of the DALI backend (CPU-only mode) against the torch backend, same process.

Wall-clock images/s on a shared machine follow the neighbours' load (tools/bench_loader.py measures
those); CPU seconds per image barely do. This counts the process's own CPU time (DALI's threads) plus
that of finished child processes (the torch backend's DataLoader workers, joined at each epoch's end),
per delivered image, for training augmentation at --size, normalised float32 on the CPU. The ratio
says how many images the DALI backend delivers per CPU second relative to the torch backend;
2000 / (ms per image) is the ceiling in images/s for 2 fully free cores.

    python tools/bench_dali.py --shards DIR      # e.g. 500x375 JPEGs sharded with `kdpipe shard`
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def cpu_seconds() -> float:
    """User + system CPU of this process and of its finished, waited-for children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def one_round(backend, ids: np.ndarray, epoch: int, batch_size: int) -> tuple[float, float]:
    """(CPU ms per image, wall images/s) for one pass over ids."""
    c0, t0, n = cpu_seconds(), time.perf_counter(), 0
    for images, _, _ in backend.iter_batches(ids, epoch, batch_size):
        n += len(images)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return cpu / n * 1e3, n / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, required=True, help="shard directory (train split is read)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from pipeline.core.augment import AugSpec
    from pipeline.reader.backends.dali_backend import DaliBackend
    from pipeline.reader.backends.torch_backend import TorchBackend
    from pipeline.reader.index import ShardIndex

    index = ShardIndex(args.shards, "train")
    ids = np.arange(min(args.images, len(index)), dtype=np.int64)
    common = dict(spec=AugSpec(image_size=args.size), seed=0, train=True, device=torch.device("cpu"),
                  normalize=True, dtype=torch.float32, num_workers=args.workers, skip_corrupt=False)
    backends = {"torch backend": TorchBackend(index, **common), "dali (CPU)": DaliBackend(index, **common)}
    print(f"{len(ids)} images of {args.shards} (mean {index.heights[ids].mean():.0f}x{index.widths[ids].mean():.0f}), "
          f"batch {args.batch_size}, output {args.size}, {args.workers} workers/threads, "
          f"{len(os.sched_getaffinity(0))} usable cores, load average {os.getloadavg()[0]:.1f}")
    cost: dict[str, list[float]] = {k: [] for k in backends}
    rate: dict[str, list[float]] = {k: [] for k in backends}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, backend in backends.items():
            ms, ips = one_round(backend, ids, r, args.batch_size)
            if r:
                cost[name].append(ms)
                rate[name].append(ips)
    for name in backends:
        ms = statistics.median(cost[name])
        print(f"{name:14s} {ms:5.2f} CPU ms/image (ceiling on 2 free cores {2000 / ms:4.0f} img/s); "
              f"wall {statistics.median(rate[name]):4.0f} img/s under this load")
    ratio = statistics.median(cost["torch backend"]) / statistics.median(cost["dali (CPU)"])
    print(f"dali / torch backend, images per CPU second: {ratio:.2f}x")


if __name__ == "__main__":
    main()
