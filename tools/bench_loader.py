"""Loader benchmark: kdpipe's backends against torchvision ImageFolder + PIL, same images, same process.

    python tools/bench_loader.py                        # synthetic JPEGs (300-500 px sides), temp dir
    python tools/bench_loader.py --shards DIR --images 2048 --backends torch,dali
    python tools/bench_loader.py --backends torch,stream    # + streamed from a local `python -m http.server`
    python tools/bench_loader.py --shards URL               # streamed from URL vs a local copy of it
    kdpipe bench loader ...                             # the same

Training augmentation at --size (224): RandomResizedCrop, flip, ColorJitter(0.4, 0.4, 0.4), normalised
float32 NCHW batches of --batch-size on the CPU, --workers worker processes for every path. The reference
is what users would otherwise write (ImageFolder + PIL transforms, DataLoader) over the same JPEG bytes,
written out as an ImageFolder tree. Paths run in alternating rounds (the machine is shared and noisy)
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
    from pipeline.shards import ShardOptions, build_shards
    from pipeline.synthetic import make_imagenet_tree

    per_class = -(-images // len(WNIDS))
    make_imagenet_tree(root / "tree", WNIDS, train_per_class=per_class, val_per_class=0, val_layout=None,
                       size=(300, 500, 300, 500), progress=True)
    build_shards(root / "tree", root / "shards", classes=WNIDS, options=ShardOptions(shard_size=256), progress=False)
    return root / "shards"


def local_copy(url: str, out: Path) -> Path:
    """The train split of the shard directory at `url`, downloaded to `out` (the local path's input)."""
    from pipeline.remote import RetryingStream, fetch_manifest, member_url, read_whole

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
    from pipeline.index import ShardIndex

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
    from pipeline.augment import AugSpec
    from pipeline.loader import ImageNet100Loader

    loader = ImageNet100Loader(shards, "train", batch_size, backend=backend, device="cpu", num_workers=workers,
                               spec=AugSpec(image_size=size), drop_last=True)
    loader.set_epoch(epoch)
    return (b.images for b in loader)


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

    from pipeline.augment import AugSpec, sample_params
    from pipeline.backends import torch_backend as tb
    from pipeline.index import ShardIndex

    torch.set_num_threads(1)
    idx = ShardIndex(shards, "train")
    ids = np.arange(min(count, len(idx)))
    p = sample_params(AugSpec(image_size=size), 0, 0, ids, idx.heights[ids], idx.widths[ids])
    clock: dict[str, dict[str, float]] = {"kdpipe torch (CPU worker)": {}, "reference (PIL)": {}}

    def run(group: str, name: str, fn, items):
        t0 = time.perf_counter()
        out = [fn(i, x) for i, x in enumerate(items)]
        clock[group][name] = (time.perf_counter() - t0) / len(items) * 1e3
        return out

    g = "kdpipe torch (CPU worker)"
    data = run(g, "read", lambda i, _: idx.read(int(i)), ids)
    dec = run(g, "decode (libjpeg-turbo)", lambda i, d: tb.decode(torch.frombuffer(bytearray(d), dtype=torch.uint8)),
              data)

    def crop_resize(i, img):
        t, l, h, w = int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i])
        return np.ascontiguousarray(tb.resize_uint8(img[:, t:t + h, l:l + w], (size, size)).permute(1, 2, 0).numpy())

    small = run(g, "crop + uint8 antialiased resize", crop_resize, dec)
    batch = torch.empty((len(ids), size, size, 3), dtype=torch.uint8)
    dst = batch.numpy()

    def colour_flip(i, x):
        arr = np.asarray(tb.colour_hwc(x, float(p.brightness[i]), float(p.contrast[i]), float(p.saturation[i])))
        dst[i] = arr[:, ::-1] if p.flip[i] else arr

    run(g, "colour (LUT + matrix) + flip into the batch", colour_flip, small)
    t0 = time.perf_counter()
    tb.normalize_nhwc(batch, torch.float32)
    clock[g]["normalise (main process, batched)"] = (time.perf_counter() - t0) / len(ids) * 1e3

    g = "reference (PIL)"
    tf = reference_transform(size).transforms
    pil = run(g, "decode (PIL)", lambda i, d: Image.open(io.BytesIO(d)).convert("RGB"), data)
    for name, t in [("RandomResizedCrop", tf[0]), ("flip", tf[1]), ("ColorJitter", tf[2]), ("ToTensor", tf[3]),
                    ("Normalize", tf[4])]:
        pil = run(g, name, lambda i, x, t=t: t(x), pil)
    for group in clock.values():
        group["total"] = sum(group.values())
    return clock


def params_rate(n: int = 1_000_000) -> float:
    """sample_params samples/s on one core (best of 3)."""
    from pipeline.augment import AugSpec, sample_params

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
                    help="Comma-separated kdpipe backends: torch,dali; 'stream' = the torch backend over HTTP.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-stages", action="store_true", help="Only the throughput rounds.")
    args = ap.parse_args(argv)

    print(f"machine: {machine()}; torch {torch.__version__}")
    print(f"sample_params: {params_rate() / 1e6:.2f} M samples/s on one core (target >= 1)")
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-loader-") as tmp:
        from pipeline.remote import is_url

        url, server = None, None  # the streamed path's source: --shards URL, or a local HTTP server
        if args.shards and is_url(args.shards):
            url, shards = args.shards, local_copy(args.shards, Path(tmp) / "copy")
            args.backends += "" if "stream" in args.backends else ",stream"
        else:
            shards = Path(args.shards) if args.shards else synth_shards(Path(tmp), args.images)
            if "stream" in args.backends:
                url, server = http_server(shards)
                print(f"stream: {url} served by `python -m http.server` in its own process (it shares the cores)")
        from pipeline.index import ShardIndex

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
            for group, stages in stage_times(shards, args.size, 64).items():
                print(f"stages, {group}, ms/image on one thread: " +
                      ", ".join(f"{k} {v:.3f}" for k, v in stages.items()))
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        warm = max(1, args.workers)
        limit = args.images // args.batch_size
        if limit < warm + 4:
            raise SystemExit(f"--images {args.images} gives {limit} batches: need at least {warm + 4} "
                             f"({warm} untimed warm-up batches, one per worker, and 4 timed)")
        paths = ["reference"] + [b.strip() for b in args.backends.split(",") if b.strip()]
        rates: dict[str, list[float]] = {p: [] for p in paths}
        for r in range(args.rounds):
            for p in paths:
                it = reference_batches(tree, args.size, args.batch_size, args.workers) if p == "reference" else \
                    kdpipe_batches(url if p == "stream" else shards, "torch" if p == "stream" else p, args.size,
                                   args.batch_size, args.workers, r)
                rates[p].append(timed_round(it, limit, warm))
            print(f"round {r + 1}: " + ", ".join(f"{p} {rates[p][-1]:.0f}" for p in paths) + " img/s")
        ref = statistics.median(rates["reference"])
        print(f"reference torchvision ImageFolder + PIL: {ref:.0f} img/s (median of {args.rounds})")
        for p in paths[1:]:
            med = statistics.median(rates[p])
            paired = statistics.median(a / b for a, b in zip(rates[p], rates["reference"]))
            print(f"kdpipe {p}: {med:.0f} img/s = {med / ref:.2f}x the reference's median; "
                  f"median of the per-round ratios (each next to its reference run): {paired:.2f}x")
        if url and "torch" in rates and "stream" in rates:
            ratio = statistics.median(a / b for a, b in zip(rates["stream"], rates["torch"]))
            print(f"stream / local (torch backend, same process, per-round): {ratio:.2f}")
        if server is not None:
            server.terminate()

if __name__ == "__main__":
    main()
