"""The measurements of tools/gpu_check.py, one function per row of its table (each also runs tiny on the CPU).

Each returns a plain dict (JSON-able). Timing: the device is synchronised around every timed region; warm-up
(cuDNN autotuning, graph capture, worker start) is excluded unless a row says it is included.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.augment import AugSpec
from pipeline.reader.loader import ImageNet100Loader

PAPER_HOURS = 12.36  # 50-epoch dual-student run in the paper
IMAGENET100_TRAIN = 126_689
EPOCHS = 50


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is: full on a GPU, tiny with --quick on a CPU."""

    classes: int = 100
    unique_per_class: int = 4  # distinct JPEGs generated per class (generation is the slow part of set-up)
    per_class: int = 20  # train samples per class in the small set (2,000: decode and loader rows)
    big_per_class: int = 200  # train samples per class in the large set (20,000: cache-teacher, the training loop)
    image_hw: tuple[int, int] = (375, 500)
    image_size: int = 224
    batches: tuple[int, ...] = (256, 64)
    warmup_steps: int = 8
    steps: int = 30
    loader_epochs: int = 3  # timed passes over the small set (DALI)
    decode_epochs: int = 1  # timed passes over the large set (decode rows: enough batches for 16 workers)
    cache_epochs: int = 2  # augmentation epochs cached at scale
    equal_steps: int = 20  # eager vs graphed steps compared
    loss_steps: int = 25


QUICK = Sizes(classes=4, unique_per_class=2, per_class=4, big_per_class=4, image_hw=(48, 64), image_size=32,
              batches=(8, 4), warmup_steps=1, steps=1, loader_epochs=1, cache_epochs=2, equal_steps=5, loss_steps=3)


def nvimgcodec_installed() -> bool:
    """nvImageCodec is importable (the `cuda-hw` decode rows need it)."""
    import importlib.util

    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.nvimgcodec") is not None


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


def dtype_of(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ---------------------------------------------------------------- data

def make_data(root: Path, sizes: Sizes) -> dict[str, Path]:
    """Two shard sets from one synthetic ImageNet tree of photo-sized JPEGs: "small" (per_class a class) and "big"
    (big_per_class a class). Samples beyond the generated ones are hard links to them (same bytes, own ids):
    decoding costs what it costs for distinct photos, and generating 20,000 JPEGs would take minutes."""
    from pipeline.core.classes import imagenet100_wnids
    from pipeline.shards.writer import ShardOptions, build_shards
    from pipeline.sources.synthetic import make_imagenet_tree

    wnids = imagenet100_wnids()[: sizes.classes]
    make_imagenet_tree(root / "gen", wnids, train_per_class=sizes.unique_per_class, val_per_class=1,
                       size=sizes.image_hw, seed=0)
    out = {}
    for name, per_class in (("small", sizes.per_class), ("big", sizes.big_per_class)):
        tree = root / f"tree_{name}"
        for split, n in (("train", per_class), ("val", 1)):
            for w in wnids:
                src = sorted((root / "gen" / split / w).iterdir())
                (tree / split / w).mkdir(parents=True)
                for k in range(n):
                    os.link(src[k % len(src)], tree / split / w / f"{w}_{k}.JPEG")
        build_shards(tree, root / f"shards_{name}", classes=wnids, options=ShardOptions(shard_size=1000),
                     progress=False)
        out[name] = root / f"shards_{name}"
    return out


# ---------------------------------------------------------------- models and steps

def distiller(num_classes: int, batch: int, device: torch.device, sizes: Sizes, *, online_teacher: bool,
              graphs: str = "off", mode: str = "dual", compile: str = "off"):
    from trainer.config import make_config
    from trainer.engine.models import build_model
    from trainer.engine.step import Distiller

    cfg = make_config(mode, ("resnet18", "mobilenet_v2"), batch_size=batch, epochs=1, device=str(device),
                      amp="bf16" if device.type == "cuda" else "fp32", image_size=sizes.image_size,
                      cuda_graphs=graphs, compile=compile)
    torch.manual_seed(0)
    students = [build_model(n, num_classes) for n in cfg.students]
    teacher = build_model("resnet50", num_classes) if online_teacher else None
    return Distiller(cfg, students, teacher=teacher, device=device, steps_per_epoch=10_000)


def fake_batch(batch: int, num_classes: int, size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    logits = (3 * torch.randn(batch, num_classes, generator=g)).to(device)
    return images, labels, logits


def with_graphs(d, on: bool) -> None:
    """Switch a Distiller between eager steps and a fresh CUDA graph (for measuring both on one model)."""
    from trainer.engine.graphed import GraphedStep

    d.graphed = GraphedStep(d._compute, d.optimizers, d.device) if on else None


def bench_steps(num_classes: int, device: torch.device, sizes: Sizes) -> dict:
    """Dual-student img/s on device-resident data, eager vs CUDA graph: teacher logits given (the ceiling) and
    the online ResNet-50 teacher. Per step also the host's enqueue time (the call's return, before the sync)."""
    out = {}
    cuda = device.type == "cuda"
    for batch in sizes.batches:
        images, labels, logits = fake_batch(batch, num_classes, sizes.image_size, device)
        d = distiller(num_classes, batch, device, sizes, online_teacher=True)
        row = {}
        for graphs in ((False, True) if cuda else (False,)):
            name = "graphs" if graphs else "eager"
            for kind, args in (("cached", (images, labels, logits)), ("online", (images, labels))):
                with_graphs(d, graphs)
                t = timed(lambda: d.step(*args), device, sizes.warmup_steps, sizes.steps)
                t_host = _enqueue_seconds(lambda: d.step(*args), device, sizes.steps)
                row[f"{kind}_{name}_images_per_s"] = batch / t
                row[f"{kind}_{name}_ms"] = 1000 * t
                row[f"{kind}_{name}_host_ms"] = 1000 * t_host
        with_graphs(d, False)
        out[str(batch)] = row
        del d
        if cuda:
            torch.cuda.empty_cache()
    return out


def _enqueue_seconds(fn, device: torch.device, steps: int) -> float:
    """Host seconds per call to enqueue `steps` calls (no sync inside; the queue drains after)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    t = (time.perf_counter() - t0) / steps
    sync(device)
    return t


def check_graph_equal(num_classes: int, device: torch.device, sizes: Sizes) -> dict:
    """Eager and graphed steps from the same initial weights on the same batches (and dropout seeds): per-step
    losses, weights and BatchNorm statistics after N steps, within bf16 tolerance."""
    from trainer.engine.step import step_seed

    if device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    batch = sizes.batches[-1]
    data = [fake_batch(batch, num_classes, sizes.image_size, device, seed=s) for s in range(4)]
    runs = {}
    for graphs in ("off", "on"):
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # same algorithms
        d = distiller(num_classes, batch, device, sizes, online_teacher=False, graphs=graphs)
        losses = []
        for k in range(sizes.equal_steps):
            torch.manual_seed(step_seed(0, k))
            s = d.step(*data[k % len(data)])
            losses.append((s.terms[:, 0] / s.count).tolist())
        sync(device)
        runs[graphs] = (losses, [m.state_dict() for m in d.students],
                        None if d.graphed is None else (d.graphed.replays, d.graphed.eager_fallbacks))
        del d
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    (le, we, _), (lg, wg, counts) = runs["off"], runs["on"]
    loss_diff = max(abs(a - b) / max(abs(a), 1e-6) for x, y in zip(le, lg) for a, b in zip(x, y))
    worst_w, worst_bn = 0.0, 0.0
    for se, sg in zip(we, wg):
        for k, a in se.items():
            if not a.is_floating_point():
                continue
            rel = float((a.float() - sg[k].float()).norm() / a.float().norm().clamp(min=1e-12))
            if "running_" in k:
                worst_bn = max(worst_bn, rel)
            else:
                worst_w = max(worst_w, rel)
    ok = loss_diff < 2e-2 and worst_w < 2e-2 and worst_bn < 2e-2 and counts[0] >= sizes.equal_steps - 4
    return {"steps": sizes.equal_steps, "max_rel_loss_diff": loss_diff, "max_rel_weight_diff": worst_w,
            "max_rel_bn_stat_diff": worst_bn, "replays": counts[0], "eager_fallbacks": counts[1], "ok": ok}


def check_loss_falls(num_classes: int, device: torch.device, sizes: Sizes) -> dict:
    batch = sizes.batches[-1]
    images, labels, logits = fake_batch(batch, num_classes, sizes.image_size, device)
    d = distiller(num_classes, batch, device, sizes, online_teacher=False, graphs="auto")
    losses = []
    for _ in range(sizes.loss_steps):
        stats = d.step(images, labels, logits)
        losses.append(float(stats.terms[0, 0] / stats.count))
    return {"first_loss": losses[0], "last_loss": losses[-1], "ok": losses[-1] < losses[0],
            "graphed": d.graphed is not None}


# ---------------------------------------------------------------- data rows

def bench_decode(shards: Path, device: torch.device, sizes: Sizes, decode_device: str, epochs: int) -> dict:
    """Images/s of decode + training augmentation + normalisation, output on the device."""
    loader = ImageNet100Loader(shards, "train", sizes.batches[0], backend="torch", device=device,
                               spec=AugSpec(image_size=sizes.image_size), dtype=dtype_of(device),
                               decode_device=decode_device)
    n, rate = epochs_rate(loader, device, epochs)
    return {"images": n, "images_per_s": rate, "batch": sizes.batches[0], "workers": loader.num_workers}


def epochs_rate(loader: ImageNet100Loader, device: torch.device, epochs: int) -> tuple[int, float]:
    """(images, images/s) of `epochs` epochs after a warm-up epoch (worker start, nvJPEG handles, allocator)."""
    loader.set_epoch(0)
    for _ in loader:
        pass
    sync(device)
    n, t0 = 0, time.perf_counter()
    for epoch in range(1, 1 + epochs):
        loader.set_epoch(epoch)
        for b in loader:
            n += len(b)
    sync(device)
    return n, n / (time.perf_counter() - t0)


def bench_dali(shards: Path, device: torch.device, sizes: Sizes) -> dict:
    """The DALI backend's decode + augment rate, and its pixels against the torch backend's (same ids)."""
    from pipeline.reader.backends.registry import dali_available

    if not dali_available():
        return {"skipped": "nvidia-dali is not installed here"}
    loader = ImageNet100Loader(shards, "train", sizes.batches[0], backend="dali", device=device,
                               spec=AugSpec(image_size=sizes.image_size), dtype=dtype_of(device))
    n, rate = epochs_rate(loader, device, sizes.loader_epochs)
    views = {}
    for backend in ("dali", "torch"):
        lo = ImageNet100Loader(shards, "train", 16, backend=backend, device=device, normalize=False,
                               spec=AugSpec(image_size=sizes.image_size), num_workers=2)
        lo.set_epoch(0)
        b = next(iter(lo))
        views[backend] = (b.ids.cpu(), b.images.cpu().float())
    same = bool(torch.equal(views["dali"][0], views["torch"][0]))
    return {"images_per_s": rate, "images": n, "same_ids": same,
            "mean_abs_diff_grey_levels": float((views["dali"][1] - views["torch"][1]).abs().mean())}


def check_geometry(shards: Path, device: torch.device, sizes: Sizes) -> dict:
    """Same (seed, epoch, id) on the CPU path and on `device`'s nvJPEG path (and its hardware JPEG engines when
    nvImageCodec is installed, under "hw"): colour off, only decoders differ."""
    spec = AugSpec(image_size=sizes.image_size, brightness=0.0, contrast=0.0, saturation=0.0)
    cuda = device.type == "cuda"
    runs = [("ref", "cpu", "cpu"), ("dev", str(device), "cuda" if cuda else "cpu")]
    if cuda and nvimgcodec_installed():
        runs.append(("hw", str(device), "cuda-hw"))
    got = {}
    for key, dev, decode in runs:
        loader = ImageNet100Loader(shards, "train", 16, backend="torch", device=dev, spec=spec, normalize=False,
                                   num_workers=1, decode_device=decode)
        loader.set_epoch(0)
        b = next(iter(loader))
        got[key] = (b.ids.cpu(), b.images.cpu().float())

    def versus_ref(key: str) -> dict:
        (ids_a, a), (ids_b, b) = got["ref"], got[key]
        same, mad = bool(torch.equal(ids_a, ids_b)), float((a - b).abs().mean())
        return {"same_ids": same, "mean_abs_diff_grey_levels": mad, "ok": same and mad < 3.0}

    out = versus_ref("dev")
    if "hw" in got:
        out["hw"] = versus_ref("hw")
    return out


# ---------------------------------------------------------------- teacher cache at scale

def bench_cache_teacher(shards: Path, work: Path, num_classes: int, device: torch.device, sizes: Sizes,
                        decode_device: str) -> dict:
    """`cache-teacher` over the large set (the whole job, as a user runs it), against plain ResNet-50 inference on
    device-resident images. Run twice, for 1 and for `cache_epochs` augmentation epochs, into separate stores: the
    difference is the steady rate of the extra epochs, without the job's fixed costs (start, model, first batches)."""
    from trainer.jobs.cache_teacher import CacheTeacherConfig, cache_teacher
    from trainer.engine.models import build_model

    weights = work / "teacher.pt"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(build_model("resnet50", num_classes).state_dict(), weights)
    batch, per_epoch = sizes.batches[0], sizes.classes * sizes.big_per_class
    seconds = {}
    for epochs in (1, sizes.cache_epochs):
        cfg = CacheTeacherConfig(shards=str(shards), out=str(work / f"teacher-{decode_device}-{epochs}.zarr"),
                                 teacher_weights=str(weights), epochs=epochs, image_size=sizes.image_size,
                                 batch_size=batch, chunk_n=batch * 8, backend="torch", device=str(device),
                                 progress=False, decode_device=decode_device)
        t0 = time.perf_counter()
        cache_teacher(cfg)
        seconds[epochs] = time.perf_counter() - t0
    n = per_epoch * sizes.cache_epochs
    extra = seconds[sizes.cache_epochs] - seconds[1]
    model = build_model("resnet50", num_classes).to(device, memory_format=torch.channels_last).eval()
    images, _, _ = fake_batch(batch, num_classes, sizes.image_size, device)

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype_of(device), enabled=device.type == "cuda"):
            model(images)

    t_infer = timed(infer, device, sizes.warmup_steps, max(2, sizes.steps))
    per_extra_epoch = extra / (sizes.cache_epochs - 1) if sizes.cache_epochs > 1 and extra > 0 else None
    return {"images": n, "decode_device": decode_device,
            "cache_teacher_images_per_s": n / seconds[sizes.cache_epochs],
            "steady_images_per_s": per_epoch / per_extra_epoch if per_extra_epoch else None,
            "fixed_seconds": seconds[1] - per_extra_epoch if per_extra_epoch else None,
            "inference_images_per_s": batch / t_infer, "seconds": seconds[sizes.cache_epochs], "cache": cfg.out}


# ---------------------------------------------------------------- the training loop, loader-fed

def bench_train_loop(shards: Path, cache: str, work: Path, device: torch.device, sizes: Sizes, batch: int,
                     decode_device: str, graphs: str) -> dict:
    """`kdpipe train` (the real loop: loader, cache lookups, step, progress, evaluation, checkpoints) on the large
    set with the cache, 2 epochs; the second epoch's img/s and data share (the first includes warm-up)."""
    import json

    from trainer.config import make_config
    from trainer.jobs.train import train

    out = work / f"run-{batch}-{decode_device}-{graphs}"
    cfg = make_config("dual", ("resnet18", "mobilenet_v2"), shards=str(shards), out=str(out), teacher_cache=cache,
                      epochs=2, batch_size=batch, image_size=sizes.image_size, backend="torch",
                      device=str(device), cuda_graphs=graphs, decode_device=decode_device,
                      log_every=50 if device.type == "cuda" else 1)
    t0 = time.perf_counter()
    train(cfg, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = rows[-1]
    return {"batch": batch, "decode_device": decode_device, "cuda_graphs": graphs,
            "images_per_s": last["images_per_s"], "data_share": last["data_share"], "epoch_s": last["epoch_time_s"],
            "first_epoch_images_per_s": rows[0]["images_per_s"], "wall_s": wall}


# ---------------------------------------------------------------- profile

def profile_step(num_classes: int, device: torch.device, sizes: Sizes, batch: int, top: int = 12) -> dict:
    """torch.profiler over a few eager steps (top kernels by GPU time) and the host-vs-GPU split, eager vs graphed."""
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return {"skipped": "the kernel profile needs a CUDA device"}
    images, labels, logits = fake_batch(batch, num_classes, sizes.image_size, device)
    d = distiller(num_classes, batch, device, sizes, online_teacher=False)
    out = {}
    for graphs in (False, True):
        with_graphs(d, graphs)
        for _ in range(sizes.warmup_steps):
            d.step(images, labels, logits)
        sync(device)
        steps = 5
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                d.step(images, labels, logits)
            host = (time.perf_counter() - t0) / steps
            sync(device)
            wall = (time.perf_counter() - t0) / steps
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_us = sum(e.self_device_time_total for e in events) / steps
        name = "graphs" if graphs else "eager"
        out[name] = {"wall_ms": 1000 * wall, "host_enqueue_ms": 1000 * host, "gpu_kernels_ms": kernel_us / 1000,
                     "gpu_busy": kernel_us / 1e6 / wall}
        if not graphs:
            events.sort(key=lambda e: e.self_device_time_total, reverse=True)
            out["top_kernels"] = [{"name": e.key[:90], "ms_per_step": e.self_device_time_total / steps / 1000,
                                   "share": e.self_device_time_total / max(kernel_us * steps, 1e-9)}
                                  for e in events[:top]]
    return out


def bench_compile(num_classes: int, device: torch.device, sizes: Sizes, modes: list[str]) -> dict:
    """torch.compile of both students in each mode (`kdpipe train --compile MODE`): first-step seconds
    (compilation) and steady img/s; for the modes without CUDA graphs of their own also inside the step's graph
    (`--cuda-graphs on`), the combination that can fuse BatchNorm and drop the host's launches at once."""
    from trainer.engine.graphed import COMPILE_OWN_GRAPHS

    out = {}
    for mode in modes:
        for batch in sizes.batches:
            images, labels, logits = fake_batch(batch, num_classes, sizes.image_size, device)
            d = distiller(num_classes, batch, device, sizes, online_teacher=False, compile=mode)
            t0 = time.perf_counter()
            d.step(images, labels, logits)
            sync(device)
            first = time.perf_counter() - t0
            t = timed(lambda: d.step(images, labels, logits), device, sizes.warmup_steps, sizes.steps)
            row = {"first_step_s": first, "images_per_s": batch / t}
            if device.type == "cuda" and mode not in COMPILE_OWN_GRAPHS:
                with_graphs(d, True)
                t = timed(lambda: d.step(images, labels, logits), device, sizes.warmup_steps, sizes.steps)
                row["graphs_images_per_s"] = batch / t
                with_graphs(d, False)
            out[f"{mode}/{batch}"] = row
            del d
    return out


def estimate(img_s: float) -> dict:
    hours = EPOCHS * IMAGENET100_TRAIN / img_s / 3600
    return {"images_per_s": img_s, "minutes_50_epochs": 60 * hours, "speedup_vs_paper": PAPER_HOURS / hours}
