"""Teacher-cache benchmarks; every figure is a ratio against a baseline run in this same process.

1. cache-teacher throughput vs pure teacher inference over the very same (pre-built) batches;
2. training step with cached logits vs with the online teacher (same students, batch, images);
   lookup per batch (in-memory epoch slice) as a fraction of that step, and vs zarr-python gathers;
3. bytes on disk per sample-epoch (full float16 logits and top-k), at ImageNet-100's shape.

    python tools/bench_cache.py                      # small CPU defaults (a few minutes on 2 cores)
    python tools/bench_cache.py --image-size 224 --batch-size 64 --device cuda   # the real thing on a GPU
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142", "n01558993", "n01692333", "n01729322", "n01735189"]


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"CPU only: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_data(root: Path, per_class: int, teacher: str) -> tuple[Path, Path]:
    from pipeline.shards.writer import build_shards
    from pipeline.sources.synthetic import make_imagenet_tree
    from trainer.engine.models import build_model

    make_imagenet_tree(root / "tree", WNIDS, train_per_class=per_class, val_per_class=1, size=(375, 500))
    build_shards(root / "tree", root / "shards", classes=WNIDS, progress=False)
    torch.save(build_model(teacher, len(WNIDS)).state_dict(), root / "teacher.pt")
    return root / "shards", root / "teacher.pt"


def bench_job(args, root: Path, device: torch.device) -> None:
    """cache-teacher (decode + augment + teacher + store) vs the teacher alone on the same batches."""
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader
    from trainer.jobs.cache_teacher import CacheTeacherConfig, cache_teacher
    from trainer.engine.runtime import load_teacher, precision_dtype, precision_name, teacher_forward

    shards, weights = make_data(root, args.per_class, args.teacher)
    cfg = CacheTeacherConfig(shards=str(shards), out=str(root / "job.zarr"), teacher_weights=str(weights),
                             teacher=args.teacher, epochs=1, image_size=args.image_size, batch_size=args.batch_size,
                             chunk_n=args.batch_size * 4, device=str(device), progress=False)
    n = args.per_class * len(WNIDS)
    loader = ImageNet100Loader(cfg.shards, "train", args.batch_size, seed=cfg.seed, device=device,
                               spec=AugSpec(image_size=args.image_size))
    backend = loader.backend_name
    batches = [b.images.to(device) for b in loader.iter_views(np.arange(n), 0)]
    model = load_teacher(args.teacher, weights, WNIDS, device)
    dtype = precision_dtype("auto", device)
    precision = precision_name(dtype)
    teacher_forward(model, batches[0], dtype)  # warm-up

    def inference() -> float:
        sync(device)
        t0 = time.perf_counter()
        for images in batches:
            teacher_forward(model, images, dtype)
        sync(device)
        return n / (time.perf_counter() - t0)

    def job(i: int) -> float:
        t0 = time.perf_counter()
        cache_teacher(dataclasses.replace(cfg, out=str(root / f"job-{i}.zarr")))
        return n / (time.perf_counter() - t0)

    # interleaved rounds, medians: the machine's load drifts (other processes), so back-to-back pairs compare fairly
    rounds = [(inference(), job(i)) for i in range(args.rounds)]
    infer, job_rate = (float(np.median(col)) for col in zip(*rounds))
    print(f"[job] {n} images {args.image_size}px, teacher {args.teacher} ({precision}), backend {backend}, "
          f"batch {args.batch_size}")
    print(f"[job] teacher inference only (pre-built batches): {infer:8.1f} img/s   rounds: "
          + ", ".join(f"{a:.1f}" for a, _ in rounds))
    print(f"[job] cache-teacher end to end (views + teacher + store, incl. start-up): {job_rate:8.1f} img/s   "
          f"rounds: " + ", ".join(f"{b:.1f}" for _, b in rounds))
    ratio = float(np.median([b / a for a, b in rounds]))
    print(f"[job] ratio {ratio:.2f} of pure inference (median over {args.rounds} back-to-back pairs)")


def bench_step(args, root: Path, device: torch.device) -> None:
    """Training step with the online teacher vs with cached logits; lookup cost vs the step."""
    from pipeline.cache.store import CacheLayout, TeacherCache, TeacherCacheWriter
    from trainer.config import make_config
    from trainer.engine.step import Distiller
    from trainer.engine.models import build_model

    c, b = len(WNIDS), args.batch_size
    cfg = make_config("dual", None, epochs=1, batch_size=b, image_size=args.image_size, device=str(device))
    torch.manual_seed(0)
    students = [build_model(s, c) for s in cfg.students]
    teacher = build_model(args.teacher, c)
    images = torch.randn(b, 3, args.image_size, args.image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, c, (b,), device=device)
    online = Distiller(cfg, copy.deepcopy(students), teacher=teacher, device=device, steps_per_epoch=100)
    cached = Distiller(cfg, copy.deepcopy(students), teacher=None, device=device, steps_per_epoch=100)
    z, w = torch.randn(b, c, device=device), torch.rand(b, device=device)

    def once(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    run_online, run_cached = (lambda: online.step(images, labels)), (lambda: cached.step(images, labels, z, w))
    once(run_online), once(run_cached)  # warm-up
    pairs = [(once(run_online), once(run_cached)) for _ in range(args.steps)]  # interleaved: fair under noise
    t_online, t_cached = (float(np.median(col)) for col in zip(*pairs))
    print(f"[step] dual step {'+'.join(cfg.students)}, batch {b}, {args.image_size}px, "
          f"median of {args.steps} interleaved steps")
    ratios = [a / b for a, b in pairs]
    print(f"[step] with online teacher {args.teacher}: {t_online * 1e3:8.1f} ms   with cached logits: "
          f"{t_cached * 1e3:8.1f} ms   speed-up {float(np.median(ratios)):.2f}x (median of per-pair ratios: "
          + ", ".join(f"{r:.2f}" for r in ratios) + ")")

    n, classes = 126_689, 100  # ImageNet-100's train split
    lay = CacheLayout(epochs=2, num_samples=n, num_classes=classes)
    writer = TeacherCacheWriter.create(root / "big.zarr", lay, {"bench": True})
    rng = np.random.default_rng(0)
    for e, ch in lay.units():
        lo, hi = lay.id_range(ch)
        writer.write_unit(e, ch, rng.normal(0, 3, (hi - lo, classes)).astype(np.float32))
    cache = TeacherCache(root / "big.zarr")
    t0 = time.perf_counter()
    cache.lookup(0, [0])
    load = time.perf_counter() - t0
    ids = [rng.integers(0, n, b) for _ in range(2000)]
    t0 = time.perf_counter()
    for i in ids:
        cache.lookup(0, i)
    per = (time.perf_counter() - t0) / len(ids)
    arr = writer.group["logits"]
    t0 = time.perf_counter()
    for i in ids[:50]:
        arr.get_orthogonal_selection((0, np.sort(i), slice(None)))
    direct = (time.perf_counter() - t0) / 50
    print(f"[lookup] epoch slice load (N={n}, C={classes}, float16): {load * 1e3:.1f} ms once per epoch")
    print(f"[lookup] per batch of {b}: {per * 1e6:.1f} us = {per / t_cached * 100:.4f} % of the cached step; "
          f"zarr-python gather baseline {direct * 1e3:.2f} ms ({direct / per:.0f}x slower)")
    cache.close()
    # top-k mode rebuilds full log-probabilities per batch: a 1000-class teacher, top-10
    lay = CacheLayout(epochs=1, num_samples=8192, num_classes=1000, topk=10)
    writer = TeacherCacheWriter.create(root / "topk.zarr", lay, {"bench": True})
    for e, ch in lay.units():
        lo, hi = lay.id_range(ch)
        writer.write_unit(e, ch, rng.normal(0, 3, (hi - lo, 1000)).astype(np.float32))
    with TeacherCache(root / "topk.zarr") as topk:
        topk.lookup(0, [0])
        t0 = time.perf_counter()
        for i in ids[:500]:
            topk.lookup(0, i % lay.num_samples)
        per_k = (time.perf_counter() - t0) / 500
    print(f"[lookup] top-10 of C=1000, rebuilt to full log-probabilities, per batch of {b}: {per_k * 1e6:.1f} us "
          f"= {per_k / t_cached * 100:.4f} % of the cached step")


def bench_bytes(root: Path) -> None:
    """Bytes per sample-epoch on disk, ImageNet-100 shape, teacher-like logits (normal, sd 3)."""
    from pipeline.cache.store import CacheLayout, TeacherCacheWriter

    n, rng = 16_384, np.random.default_rng(1)
    for classes, topk in ((100, 0), (1000, 0), (1000, 10)):
        lay = CacheLayout(epochs=1, num_samples=n, num_classes=classes, topk=topk)
        path = root / f"bytes-{classes}-{topk}.zarr"
        writer = TeacherCacheWriter.create(path, lay, {"bench": True})
        for e, ch in lay.units():
            lo, hi = lay.id_range(ch)
            writer.write_unit(e, ch, rng.normal(0, 3, (hi - lo, classes)).astype(np.float32))
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        per = size / n
        mode = f"top-{topk}" if topk else "full"
        print(f"[bytes] C={classes:4d} {mode:6s}: {per:7.1f} B per sample-epoch "
              f"(raw float16 logits {2 * classes} B); ImageNet-100 x 50 epochs: {per * 126_689 * 50 / 1e9:.2f} GB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="resnet50")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--per-class", type=int, default=16, help="train images per class (8 classes) for the job")
    p.add_argument("--steps", type=int, default=3, help="interleaved training steps per variant")
    p.add_argument("--rounds", type=int, default=3, help="interleaved inference/job rounds")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=["job", "step", "bytes"], default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"machine: {machine(device)}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.only in (None, "job"):
            bench_job(args, root, device)
        if args.only in (None, "step"):
            bench_step(args, root, device)
        if args.only in (None, "bytes"):
            bench_bytes(root)


if __name__ == "__main__":
    main()
