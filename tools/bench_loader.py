"""Loader benchmark: kdpipe's backends against torchvision ImageFolder + PIL and against the decode-only
ceiling, same images, same process.

    python tools/bench_loader.py                        # synthetic JPEGs (300-500 px sides), temp dir
    python tools/bench_loader.py --shards DIR --images 2048 --backends torch,dali
    python tools/bench_loader.py --backends torch,stream    # + streamed from a local `python -m http.server`
    python tools/bench_loader.py --shards URL               # streamed from URL vs a local copy of it
    kdpipe bench loader ...                             # the same

Training augmentation at --size (224): RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.4), normalised
float32 NCHW batches of --batch-size on the CPU, --workers worker processes for every path. The reference
is what users would otherwise write (ImageFolder + PIL transforms, DataLoader) over the same JPEG bytes,
written out as an ImageFolder tree. The ceiling ("decode-only") is what no loader that decodes whole
images can beat on these cores: the same DataLoader workers and batches, reading and decoding the same
ids with torchvision's libjpeg-turbo decoder and doing nothing else; each backend's fraction of it is
printed next to its ratio against the reference. Paths run in alternating rounds (the machine is shared and noisy)
and medians count (of the img/s, and of the per-round ratios: a round's paths run back to back, so
their ratio is less exposed to the machine's drift). Timing starts after one batch per worker
(start-up). Also printed: single-thread per-image stage times of both pipelines, sample_params/s.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def synth_shards(root: Path, images: int) -> Path:
    """Synthetic photo-like JPEGs of varied size, sharded (what the benchmark reads)."""
    from pipeline.shards.writer import ShardOptions, build_shards
    from pipeline.sources.synthetic import make_imagenet_tree

    per_class = -(-images // len(WNIDS))
    make_imagenet_tree(root / "tree", WNIDS, train_per_class=per_class, val_per_class=0, val_layout=None,
                       size=(300, 500, 300, 500), progress=True)
    build_shards(root / "tree", root / "shards", classes=WNIDS, options=ShardOptions(shard_size=256), progress=False)
    return root / "shards"


def local_copy(url: str, out: Path) -> Path:
    """The train split of the shard directory at `url`, downloaded to `out` (the local path's input)."""
    from pipeline.reader.index import fetch_manifest
    from pipeline.core.remote import RetryingStream, member_url, read_whole

    manifest = fetch_manifest(url)[0]
    out.mkdir(parents=True)
    for name in ("manifest.json", "train.index.npy"):
        (out / name).write_bytes(read_whole(member_url(url, name)))
    for entry in manifest["splits"]["train"]["shards"]:
        with RetryingStream(member_url(url, entry["name"]), entry["bytes"]) as f, open(out / entry["name"], "wb") as g:
            while chunk := f.read(1 << 20):
                g.write(chunk)
    return out


def http_server(shards: Path):
    """`python -m http.server` serving `shards` on 127.0.0.1 in its own process: (URL, process)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(shards)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return f"http://127.0.0.1:{port}", proc


def imagefolder_from_shards(shards: Path, out: Path, ids: np.ndarray) -> Path:
    """The same JPEG bytes as an ImageFolder tree (out/<wnid>/<id>.JPEG), for the reference."""
    from pipeline.reader.index import ShardIndex

    idx = ShardIndex(shards, "train")
    for i in ids.tolist():
        d = out / idx.classes[int(idx.labels[i])]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:08d}.JPEG").write_bytes(idx.read(i))
    return out


def reference_transform(size: int):
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4),
                      T.ToTensor(), T.Normalize(MEAN, STD)])


def reference_batches(tree: Path, size: int, batch_size: int, workers: int):
    from torchvision import datasets

    ds = datasets.ImageFolder(str(tree), transform=reference_transform(size))
    return iter(torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                            drop_last=True))


def kdpipe_batches(shards: Path, backend: str, size: int, batch_size: int, workers: int, epoch: int):
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader

    name, _, out = backend.partition(":")  # "torch:uint8": uint8 batches, no normalisation
    loader = ImageNet100Loader(shards, "train", batch_size, backend=name, device="cpu", num_workers=workers,
                               spec=AugSpec(image_size=size), drop_last=True, normalize=out != "uint8")
    loader.set_epoch(epoch)
    return (b.images for b in loader)


class DecodeOnly(torch.utils.data.Dataset):
    """Item k: read and fully decode the images of batch k, keep nothing (the ceiling's work)."""

    def __init__(self, shards: Path, chunks: list[np.ndarray]):
        from pipeline.reader.index import ShardIndex

        self.index, self.chunks = ShardIndex(shards, "train"), chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> torch.Tensor:
        from pipeline.reader.backends.torch_backend import decode

        for sid in self.chunks[k].tolist():
            decode(torch.frombuffer(bytearray(self.index.read(sid)), dtype=torch.uint8))
        return torch.from_numpy(self.chunks[k])


def decode_only_batches(shards: Path, batch_size: int, workers: int, epoch: int):
    """The ceiling: the ids kdpipe's loader reads in this epoch, batch by batch, decoded and dropped."""
    from pipeline.core.augment import epoch_order
    from pipeline.reader.index import ShardIndex

    ids = epoch_order(len(ShardIndex(shards, "train")), 0, epoch)
    chunks = [ids[i:i + batch_size] for i in range(0, len(ids) - batch_size + 1, batch_size)]
    return iter(torch.utils.data.DataLoader(DecodeOnly(shards, chunks), batch_size=None, num_workers=workers,
                                            worker_init_fn=lambda _: torch.set_num_threads(1),
                                            prefetch_factor=4 if workers else None))


def timed_round(batches, limit: int, warm: int) -> float:
    """Images/s over batches warm+1 .. limit: the first `warm` (one per worker: start-up, and work
    that overlapped it) are not timed."""
    for _ in range(warm):
        next(batches)
    n, t0 = 0, time.perf_counter()
    for k, images in enumerate(batches):
        if isinstance(images, (list, tuple)):
            images = images[0]
        n += len(images)
        if k + warm + 1 >= limit:
            break
    return n / (time.perf_counter() - t0) if n else float("nan")


def stage_times(shards: Path, size: int, count: int) -> dict[str, dict[str, float]]:
    """Single-thread ms per image of each stage of both pipelines on the same images."""
    from PIL import Image

    from pipeline.core.augment import AugSpec, sample_params
    from pipeline.reader.backends import cpu_views as cv
    from pipeline.reader.backends import torch_backend as tb
    from pipeline.reader.index import ShardIndex

    torch.set_num_threads(1)
    idx = ShardIndex(shards, "train")
    ids = np.arange(min(count, len(idx)))
    p = sample_params(AugSpec(image_size=size), 0, 0, ids, idx.heights[ids], idx.widths[ids])
    clock: dict[str, dict[str, float]] = {"kdpipe torch (CPU worker)": {}, "reference (PIL)": {}}

    def run(group: str, name: str, fn, items):
        fn(0, items[0])  # one-off set-up (codec libraries load lazily) is not a per-image cost
        t0 = time.thread_time()  # CPU time of this thread: other jobs on a shared machine barely move it
        out = [fn(i, x) for i, x in enumerate(items)]
        clock[group][name] = (time.thread_time() - t0) / len(items) * 1e3
        return out

    g = "kdpipe torch (CPU worker)"
    data = run(g, "read", lambda i, _: idx.read(int(i)), ids)
    hw = [(int(idx.heights[i]), int(idx.widths[i])) for i in ids]
    roi = "ROI decode (nvImageCodec)" if cv.roi_decoder() is not None else "full decode + crop (torchvision)"
    crops = run(g, roi, lambda i, d: cv.decode_region(d, hw[i], cv.crop_box(p, i)), data)

    def resize_flip(i, crop):
        small = cv.resize_uint8(crop, (size, size)).permute(1, 2, 0)
        return small.flip(1) if p.flip[i] else small

    small = run(g, "uint8 antialiased resize + flip", resize_flip, crops)
    batch = torch.empty((len(ids), size, size, 3), dtype=torch.uint8)
    dst = batch.numpy()
    run(g, "colour into the batch slot", lambda i, x: cv.colour_into(
        x.numpy(), float(p.brightness[i]), float(p.contrast[i]), float(p.saturation[i]), dst[i]), small)
    t0 = time.thread_time()
    tb.normalize_nhwc(batch, torch.float32)
    clock[g]["normalise (main process, batched)"] = (time.thread_time() - t0) / len(ids) * 1e3

    g = "reference (PIL)"
    tf = reference_transform(size).transforms
    pil = run(g, "decode (PIL)", lambda i, d: Image.open(io.BytesIO(d)).convert("RGB"), data)
    for name, t in [("RandomResizedCrop", tf[0]), ("flip", tf[1]), ("ColorJitter", tf[2]), ("ToTensor", tf[3]),
                    ("Normalize", tf[4])]:
        pil = run(g, name, lambda i, x, t=t: t(x), pil)
    for group in clock.values():
        group["total"] = sum(group.values())
    # the stages one after another over all images leave caches cold; a worker runs them image by image
    builder = tb.BatchBuilder(idx, AugSpec(image_size=size), 0, 0, True, [ids], False)
    builder[0]  # warm, as the workers are after their first batch
    t0 = time.thread_time()
    builder[0]
    clock["kdpipe torch (CPU worker)"]["whole worker item, image by image"] = (time.thread_time() - t0) / len(ids) * 1e3
    g = "decode-only ceiling"
    clock[g] = {"read": clock["kdpipe torch (CPU worker)"]["read"]}
    run(g, "full decode (torchvision)", lambda i, d: cv.decode(torch.frombuffer(bytearray(d), dtype=torch.uint8)), data)
    clock[g]["total"] = sum(clock[g].values())
    return clock


def params_rate(n: int = 1_000_000) -> float:
    """sample_params samples/s on one core (best of 3)."""
    from pipeline.core.augment import AugSpec, sample_params

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    ids, h, w = np.arange(n), rng.integers(100, 600, n), rng.integers(100, 600, n)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        sample_params(AugSpec(), 0, 1, ids, h, w)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=None, help="Shard directory (default: synthetic, temp dir), or its URL: "
                    "then 'stream' reads the URL and the other paths a local copy.")
    ap.add_argument("--images", type=int, default=1024, help="Images per round (and synthetic images).")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--backends", "--backend", default="torch",
                    help="Comma-separated kdpipe backends: torch,dali; NAME:uint8 for uint8 batches (no "
                         "normalisation); 'stream' = the torch backend over HTTP.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-stages", action="store_true", help="Only the throughput rounds.")
    args = ap.parse_args(argv)

    print(f"machine: {machine()}; torch {torch.__version__}")
    print(f"sample_params: {params_rate() / 1e6:.2f} M samples/s on one core (target >= 1)")
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-loader-") as tmp:
        from pipeline.core.remote import is_url

        url, server = None, None  # the streamed path's source: --shards URL, or a local HTTP server
        if args.shards and is_url(args.shards):
            url, shards = args.shards, local_copy(args.shards, Path(tmp) / "copy")
            args.backends += "" if "stream" in args.backends else ",stream"
        else:
            shards = Path(args.shards) if args.shards else synth_shards(Path(tmp), args.images)
            if "stream" in args.backends:
                url, server = http_server(shards)
                print(f"stream: {url} served by `python -m http.server` in its own process (it shares the cores)")
        from pipeline.reader.index import ShardIndex

        n_all = len(ShardIndex(shards, "train"))
        ids = np.arange(min(n_all, args.images))
        if len(ids) < n_all:
            print(f"note: kdpipe reads the first {args.images // args.batch_size} batches of an epoch over all "
                  f"{n_all} samples; the reference reads {len(ids)} of the same images")
        tree = imagefolder_from_shards(shards, Path(tmp) / "imagefolder", ids)
        sizes = ShardIndex(shards, "train")
        print(f"images: {len(ids)}, mean {sizes.heights[ids].mean():.0f}x{sizes.widths[ids].mean():.0f} px, "
              f"batch {args.batch_size}, output {args.size}, {args.workers} workers, CPU output float32")
        if not args.skip_stages:
            clock = stage_times(shards, args.size, 64)
            for group, stages in clock.items():
                print(f"stages, {group}, CPU ms/image on one thread: " +
                      ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))
            kd, ceil = clock["kdpipe torch (CPU worker)"], clock["decode-only ceiling"]["total"]
            item, norm = kd["whole worker item, image by image"], kd["normalise (main process, batched)"]
            print(f"CPU per image: a worker's item {item:.3f} ms + normalise {norm:.3f} vs the ceiling's {ceil:.3f}: "
                  f"the torch backend can reach {ceil / item:.2f} of the ceiling in uint8, {ceil / (item + norm):.2f} "
                  f"in float32 (CPU-bound, before DataLoader overheads; load barely moves these)")
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        warm = max(1, args.workers)
        limit = args.images // args.batch_size
        if limit < warm + 4:
            raise SystemExit(f"--images {args.images} gives {limit} batches: need at least {warm + 4} "
                             f"({warm} untimed warm-up batches, one per worker, and 4 timed)")
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        paths = ["reference", "decode-only"] + backends
        rates: dict[str, list[float]] = {p: [] for p in paths}
        for r in range(args.rounds):
            for p in paths:
                if p == "reference":
                    it = reference_batches(tree, args.size, args.batch_size, args.workers)
                elif p == "decode-only":
                    it = decode_only_batches(shards, args.batch_size, args.workers, r)
                elif p == "stream":  # the torch backend reading the URL
                    it = kdpipe_batches(url, "torch", args.size, args.batch_size, args.workers, r)
                else:
                    it = kdpipe_batches(shards, p, args.size, args.batch_size, args.workers, r)
                rates[p].append(timed_round(it, limit, warm))
            print(f"round {r + 1}: " + ", ".join(f"{p} {rates[p][-1]:.0f}" for p in paths) + " img/s")
        ref, ceil = statistics.median(rates["reference"]), statistics.median(rates["decode-only"])
        print(f"reference torchvision ImageFolder + PIL: {ref:.0f} img/s (median of {args.rounds})")
        print(f"decode-only ceiling (read + full libjpeg-turbo decode, nothing else): {ceil:.0f} img/s")
        for p in backends:
            med = statistics.median(rates[p])
            paired = statistics.median(a / b for a, b in zip(rates[p], rates["reference"]))
            frac = statistics.median(a / b for a, b in zip(rates[p], rates["decode-only"]))
            print(f"kdpipe {p}: {med:.0f} img/s = {med / ref:.2f}x the reference's median "
                  f"(median of per-round ratios {paired:.2f}x); {med / ceil:.2f} of the decode-only ceiling "
                  f"(median of per-round fractions {frac:.2f}; target >= 0.75)")
        if url and "torch" in rates and "stream" in rates:
            ratio = statistics.median(a / b for a, b in zip(rates["stream"], rates["torch"]))
            print(f"stream / local (torch backend, same process, per-round): {ratio:.2f}")
        if server is not None:
            server.terminate()

if __name__ == "__main__":
    main()
