"""One GPU check for the whole path, in a single short call (tools/gpu_check.sh runs it on the device).

Measures, on one GPU in one process, warm-up excluded:
  1. decode + 224 training augmentation through the torch backend on the GPU (torchvision nvJPEG);
  2. dual-student steps (ResNet-18 + MobileNetV2, bf16, channels_last) at batch 256 and 64: on data already on
     the GPU with given teacher logits (the ceiling), fed by the real loader + teacher cache, and with the online
     ResNet-50 teacher;
  3. cache-teacher throughput vs plain ResNet-50 inference on the same number of images;
  4. the 50-epoch ImageNet-100 estimate against the paper's 12.36 h;
and checks: GPU augmentation has the CPU path's geometry, and a few GPU steps lower the loss.
`--quick` runs the same code tiny on the CPU (a test runs it, so the script cannot rot between GPU runs).
Figures go to OUT/gpu_check.json; a short table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout (PYTHONPATH=.)

from pipeline.augment import AugSpec  # noqa: E402
from pipeline.loader import ImageNet100Loader  # noqa: E402

PAPER_HOURS = 12.36  # 50-epoch dual-student run in the paper
IMAGENET100_TRAIN = 126_689
EPOCHS = 50


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is: full on a GPU, tiny with --quick on a CPU."""

    classes: int = 100
    per_class: int = 20  # train images per class (2,000 ImageNet-sized JPEGs)
    image_hw: tuple[int, int] = (375, 500)
    image_size: int = 224
    batches: tuple[int, ...] = (256, 64)
    warmup_steps: int = 8
    steps: int = 30
    loader_epochs: int = 3  # timed passes over the synthetic train split
    loss_steps: int = 25


QUICK = Sizes(classes=4, per_class=4, image_hw=(48, 64), image_size=32, batches=(8, 4), warmup_steps=1, steps=1,
              loader_epochs=1, loss_steps=4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call of fn(), after warm-up calls, with the device synchronised around the timed region."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def make_data(root: Path, sizes: Sizes) -> Path:
    """A synthetic ImageNet tree of photo-sized JPEGs, sharded with the real writer; returns the shard dir."""
    from pipeline.classes import imagenet100_wnids
    from pipeline.shards import ShardOptions, build_shards
    from pipeline.synthetic import make_imagenet_tree

    wnids = imagenet100_wnids()[: sizes.classes]
    make_imagenet_tree(root / "tree", wnids, train_per_class=sizes.per_class, val_per_class=1,
                       size=sizes.image_hw, seed=0)
    build_shards(root / "tree", root / "shards", classes=wnids, options=ShardOptions(shard_size=500),
                 progress=False)
    return root / "shards"


def distiller(num_classes: int, batch: int, device: torch.device, sizes: Sizes, *, online_teacher: bool):
    from trainer.config import make_config
    from trainer.step import Distiller
    from trainer.models import build_model

    cfg = make_config("dual", ("resnet18", "mobilenet_v2"), batch_size=batch, epochs=1, device=str(device),
                      amp="bf16" if device.type == "cuda" else "fp32", image_size=sizes.image_size)
    students = [build_model(n, num_classes) for n in cfg.students]
    teacher = build_model("resnet50", num_classes) if online_teacher else None
    return Distiller(cfg, students, teacher=teacher, device=device, steps_per_epoch=10_000)


def fake_batch(batch: int, num_classes: int, size: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    logits = (3 * torch.randn(batch, num_classes, generator=g)).to(device)
    return images, labels, logits


def bench_decode(shards: Path, device: torch.device, sizes: Sizes) -> dict:
    """Images/s of decode + training augmentation + normalisation, output on the device."""
    loader = ImageNet100Loader(shards, "train", sizes.batches[0], backend="torch", device=device,
                               spec=AugSpec(image_size=sizes.image_size), dtype=torch.bfloat16 if device.type == "cuda"
                               else torch.float32)
    loader.set_epoch(0)
    for _ in loader:  # warm-up epoch: worker start, nvJPEG handles, allocator
        pass
    sync(device)
    n, t0 = 0, time.perf_counter()
    for epoch in range(1, 1 + sizes.loader_epochs):
        loader.set_epoch(epoch)
        for b in loader:
            n += len(b)
    sync(device)
    return {"images": n, "images_per_s": n / (time.perf_counter() - t0), "batch": sizes.batches[0]}


def bench_steps(num_classes: int, device: torch.device, sizes: Sizes) -> dict:
    """Dual-student images/s on device-resident data: teacher logits given (ceiling) vs online teacher."""
    out = {}
    for batch in sizes.batches:
        images, labels, logits = fake_batch(batch, num_classes, sizes.image_size, device)
        cached = distiller(num_classes, batch, device, sizes, online_teacher=False)
        t_cached = timed(lambda: cached.step(images, labels, logits), device, sizes.warmup_steps, sizes.steps)
        online = distiller(num_classes, batch, device, sizes, online_teacher=True)
        t_online = timed(lambda: online.step(images, labels), device, sizes.warmup_steps, sizes.steps)
        out[str(batch)] = {"ceiling_images_per_s": batch / t_cached, "online_teacher_images_per_s": batch / t_online,
                           "cached_vs_online": t_online / t_cached}
    return out


def bench_cache_teacher(shards: Path, work: Path, num_classes: int, device: torch.device, sizes: Sizes) -> dict:
    """cache-teacher over the train split vs plain ResNet-50 inference on as many device-resident images."""
    from trainer.cache_teacher import CacheTeacherConfig, cache_teacher
    from trainer.models import build_model

    weights = work / "teacher.pt"
    torch.save(build_model("resnet50", num_classes).state_dict(), weights)
    batch = sizes.batches[0]
    cfg = CacheTeacherConfig(shards=str(shards), out=str(work / "teacher.zarr"), teacher_weights=str(weights),
                             epochs=1, image_size=sizes.image_size, batch_size=batch, chunk_n=batch * 4,
                             backend="torch", device=str(device), progress=False)
    n = sizes.classes * sizes.per_class
    t0 = time.perf_counter()
    cache_teacher(cfg)
    t_cache = time.perf_counter() - t0

    model = build_model("resnet50", num_classes).to(device, memory_format=torch.channels_last).eval()
    images, _, _ = fake_batch(batch, num_classes, sizes.image_size, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            model(images)

    t_infer = timed(infer, device, sizes.warmup_steps, max(1, -(-n // batch))) * -(-n // batch)
    return {"images": n, "cache_teacher_images_per_s": n / t_cache, "inference_images_per_s": n / t_infer,
            "ratio": t_infer / t_cache, "cache": cfg.out, "note": "cache-teacher includes worker start and store writes"}


def bench_loader_fed(shards: Path, cache: str, num_classes: int, device: torch.device, sizes: Sizes) -> dict:
    """Dual-student images/s fed by the real loader with teacher logits from the cache."""
    out = {}
    for batch in sizes.batches:
        loader = ImageNet100Loader(shards, "train", batch, backend="torch", device=device,
                                   spec=AugSpec(image_size=sizes.image_size), teacher_cache=cache,
                                   dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        d = distiller(num_classes, batch, device, sizes, online_teacher=False)
        loader.set_epoch(0)
        for b in loader:  # warm-up epoch
            d.step(b.images, b.labels, b.teacher_logits, b.teacher_weight)
        sync(device)
        n, t0 = 0, time.perf_counter()
        for epoch in range(1, 1 + sizes.loader_epochs):
            loader.set_epoch(epoch)
            for b in loader:
                d.step(b.images, b.labels, b.teacher_logits, b.teacher_weight)
                n += len(b)
        sync(device)
        out[str(batch)] = {"images_per_s": n / (time.perf_counter() - t0), "images": n}
    return out


def check_geometry(shards: Path, device: torch.device, sizes: Sizes) -> dict:
    """Same (seed, epoch, id) on the CPU path and on `device`: colour off, so only decoders may differ."""
    spec = AugSpec(image_size=sizes.image_size, brightness=0.0, contrast=0.0, saturation=0.0)
    got = {}
    for dev in ("cpu", str(device)):
        loader = ImageNet100Loader(shards, "train", 16, backend="torch", device=dev, spec=spec, normalize=False,
                                   num_workers=1)
        loader.set_epoch(0)
        b = next(iter(loader))
        got[dev] = (b.ids.cpu(), b.images.cpu().float())
    (ids_a, a), (ids_b, b) = got["cpu"], got[str(device)]
    mad = float((a - b).abs().mean())
    return {"same_ids": bool(torch.equal(ids_a, ids_b)), "mean_abs_diff_grey_levels": mad,
            "ok": bool(torch.equal(ids_a, ids_b)) and mad < 3.0}


def check_loss_falls(num_classes: int, device: torch.device, sizes: Sizes) -> dict:
    batch = sizes.batches[-1]
    images, labels, logits = fake_batch(batch, num_classes, sizes.image_size, device)
    d = distiller(num_classes, batch, device, sizes, online_teacher=False)
    losses = []
    for _ in range(sizes.loss_steps):
        stats = d.step(images, labels, logits)
        losses.append(float(stats.terms[0, 0] / stats.count))
    return {"first_loss": losses[0], "last_loss": losses[-1], "ok": losses[-1] < losses[0]}


def estimate(img_s: float) -> dict:
    hours = EPOCHS * IMAGENET100_TRAIN / img_s / 3600
    return {"images_per_s": img_s, "hours_50_epochs": hours, "speedup_vs_paper": PAPER_HOURS / hours}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (a smoke test, not a measurement)")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    args = ap.parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    device = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if not args.quick and device.type != "cuda":
        raise SystemExit("no CUDA GPU here: run with --quick for the CPU smoke test")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    print(f"gpu_check on {name}; torch {torch.__version__}; quick={args.quick}", flush=True)
    results: dict = {"device": name, "torch": torch.__version__, "quick": args.quick, "sizes": sizes.__dict__}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        shards = make_data(work, sizes)
        results["data_seconds"] = time.perf_counter() - t0
        steps = [("decode", lambda: bench_decode(shards, device, sizes)),
                 ("geometry", lambda: check_geometry(shards, device, sizes)),
                 ("loss_falls", lambda: check_loss_falls(sizes.classes, device, sizes)),
                 ("steps", lambda: bench_steps(sizes.classes, device, sizes)),
                 ("cache_teacher", lambda: bench_cache_teacher(shards, work, sizes.classes, device, sizes))]
        for key, fn in steps:
            t = time.perf_counter()
            results[key] = fn()
            print(f"  {key}: {time.perf_counter() - t:.1f} s", flush=True)
        results["loader_fed"] = bench_loader_fed(shards, results["cache_teacher"]["cache"], sizes.classes, device,
                                                 sizes)
    big = str(sizes.batches[0])
    ceiling = results["steps"][big]["ceiling_images_per_s"]
    fed = results["loader_fed"][big]["images_per_s"]
    results["loader_fed_vs_ceiling"] = fed / ceiling
    results["estimate"] = {"ceiling": estimate(ceiling), "loader_fed_cached": estimate(fed),
                           "online_teacher": estimate(results["steps"][big]["online_teacher_images_per_s"])}
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    return results


def print_table(r: dict) -> None:
    print(f"\n== gpu_check on {r['device']} ({'QUICK CPU smoke test, not a measurement' if r['quick'] else 'measured'}) ==")
    print(f"decode+augment (torch backend)  {r['decode']['images_per_s']:10.0f} img/s  (batch {r['decode']['batch']})")
    for b, s in r["steps"].items():
        fed = r["loader_fed"][b]["images_per_s"]
        print(f"batch {b:>4}: ceiling {s['ceiling_images_per_s']:8.0f} img/s | loader-fed+cache {fed:8.0f} "
              f"| online teacher {s['online_teacher_images_per_s']:8.0f} | cached/online {s['cached_vs_online']:.2f}x")
    c = r["cache_teacher"]
    print(f"cache-teacher {c['cache_teacher_images_per_s']:.0f} img/s vs inference {c['inference_images_per_s']:.0f} "
          f"img/s (ratio {c['ratio']:.2f})")
    print(f"loader-fed / ceiling: {r['loader_fed_vs_ceiling']:.2f} (target >= 0.95)")
    e = r["estimate"]["loader_fed_cached"]
    print(f"50 epochs of ImageNet-100: {e['hours_50_epochs']:.2f} h loader-fed with cache "
          f"({e['speedup_vs_paper']:.1f}x faster than the paper's {PAPER_HOURS} h)")
    print(f"checks: geometry ok={r['geometry']['ok']} (MAD {r['geometry']['mean_abs_diff_grey_levels']:.2f}), "
          f"loss falls ok={r['loss_falls']['ok']}")


if __name__ == "__main__":
    main()
