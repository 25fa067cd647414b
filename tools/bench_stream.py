"""The streaming reader alone: what reading shards in order costs the main process, per image.

    python tools/bench_stream.py --shards DIR            # file:// and a local `python -m http.server` on DIR
    python tools/bench_stream.py --shards URL            # any shard URL

Reads every train sample in id order through the reader `ImageNet100Loader` uses for URLs (webdataset's tar
iterator, crc32 and index checks, packing into per-batch tensors), with no decoding, and prints the wall-clock
rate and the reader thread's CPU time per image (thread CPU time barely moves when other jobs share the
machine). Compare the CPU figure with the per-image time of decode + augment (`tools/bench_loader.py` stages):
it is the share of a core that streaming adds on top of the local path. The full loader comparison, stream
against local, is `kdpipe bench loader --backends torch,stream`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python tools/bench_stream.py`: `tools` importable


def reader_cost(src: str, batch_size: int = 64) -> tuple[int, float, float]:
    """(images, wall seconds, reader CPU seconds) to read the train split of `src` in id order."""
    from pipeline.reader.index import RemoteIndex
    from pipeline.reader.stream import needed_segments, ordered_samples, pack

    index = RemoteIndex(src, "train")
    ids = np.arange(len(index))
    t0, c0 = time.perf_counter(), time.thread_time()
    samples = ordered_samples(index, needed_segments(index.rows["shard"], ids, None), ids)
    n = 0
    for i in range(0, len(ids), batch_size):
        n += len(pack(ids[i:i + batch_size], samples, "train", False)[0])
    return n, time.perf_counter() - t0, time.thread_time() - c0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", required=True, help="Shard directory (read as file:// and over local HTTP) or URL.")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from pipeline.core.remote import is_url

    sources, server = [args.shards], None
    if not is_url(args.shards):
        from tools.bench_loader import http_server

        url, server = http_server(Path(args.shards))
        sources = [Path(args.shards).resolve().as_uri(), url]
    try:
        for src in sources:
            runs = [reader_cost(src) for _ in range(args.repeats)]
            n = runs[0][0]
            wall, cpu = min(r[1] for r in runs), min(r[2] for r in runs)
            print(f"{src}: {n} images, best of {args.repeats}: {n / wall:.0f} img/s wall, reader thread CPU "
                  f"{cpu / n * 1e3:.3f} ms/image")
    finally:
        if server is not None:
            server.terminate()


if __name__ == "__main__":
    main()
