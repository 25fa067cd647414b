"""Short epochs through the torch backend's CPU workers: a worker pool kept across epochs vs a fresh one per epoch
(what the backend did before the pool), same process, alternating rounds.

    python tools/bench_epochs.py [--images 512] [--batch-size 64] [--workers 2] [--rounds 5]

Each round times one epoch with the kept pool and one with a new pool (fork, shared batch slots, an empty
pipeline), in alternating order. An epoch's fixed start-up cost matters when epochs are short (validation
every epoch, small datasets) and when the parent process is large (a CUDA context: forks cost more there).
Prints the machine, the median epoch times and their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python tools/bench_epochs.py` from a checkout

from tools.bench_loader import machine, synth_shards  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        shards = synth_shards(Path(tmp), args.images)
        loader = ImageNet100Loader(shards, "train", args.batch_size, backend="torch", device="cpu",
                                   num_workers=args.workers, spec=AugSpec(image_size=args.size))
        times: dict[str, list[float]] = {"kept": [], "fresh": []}
        epoch = 0

        def one(kind: str) -> None:
            nonlocal epoch
            if kind == "fresh":
                loader.backend._pool = None  # the old behaviour: new workers and slots for this epoch
            loader.set_epoch(epoch)
            epoch += 1
            t0 = time.perf_counter()
            n = sum(len(b) for b in loader)
            times[kind].append(time.perf_counter() - t0)
            assert n == len(loader) * args.batch_size

        one("kept")  # the pool's own start-up, not counted
        times["kept"].clear()
        for r in range(args.rounds):
            for kind in (("kept", "fresh") if r % 2 == 0 else ("fresh", "kept")):
                one(kind)
    kept, fresh = statistics.median(times["kept"]), statistics.median(times["fresh"])
    print(f"{args.images} images, batch {args.batch_size}, {args.workers} workers, {args.size} px, "
          f"{args.rounds} rounds: epoch kept pool {kept:.3f} s, fresh pool {fresh:.3f} s: "
          f"kept/fresh {kept / fresh:.3f} ({len(loader)} batches an epoch)")
    return {"kept_s": kept, "fresh_s": fresh, "ratio": kept / fresh}


if __name__ == "__main__":
    main()
