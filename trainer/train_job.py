"""The `kdpipe train` job: loaders over the shards, the teacher (online or from a cache), DDP under torchrun.

Thin on purpose: everything that trains lives in trainer/loop.py and works with any Batch iterable.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from .config import TrainConfig, resolve_device
from .loop import dist_info, run_training
from .models import build_model, load_weights


def _init_distributed() -> torch.device | None:
    """Under torchrun (WORLD_SIZE > 1): join the process group; each rank uses GPU LOCAL_RANK if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return None
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def train(cfg: TrainConfig, *, resume: bool = False, stop_after_steps: int | None = None,
          progress: bool = True) -> dict:
    """The `kdpipe train` job: loaders over cfg.shards, the teacher (online or cached), run_training."""
    from pipeline.augment import AugSpec
    from pipeline.loader import ImageNet100Loader

    ddp_device = _init_distributed()
    if ddp_device is not None:
        cfg = dataclasses.replace(cfg, device=str(ddp_device))
    device, (rank, world) = resolve_device(cfg.device), dist_info()
    spec = AugSpec(image_size=cfg.image_size)
    common = dict(seed=cfg.seed, backend=cfg.backend, device=device, spec=spec, rank=rank, world_size=world,
                  num_workers=cfg.num_workers)
    val_loader = ImageNet100Loader(cfg.shards, "val", cfg.batch_size, drop_last=False, **common)
    classes = list(val_loader.classes)
    cache = None
    if cfg.uses_teacher and cfg.teacher_cache:
        from .cache_teacher import validate_cache_for_training

        cache = validate_cache_for_training(cfg.teacher_cache, loader=val_loader, spec=spec, seed=cfg.seed,
                                            image_size=cfg.image_size)
    train_loader = ImageNet100Loader(cfg.shards, "train", cfg.batch_size, teacher_cache=cache, **common)
    teacher = None
    if cfg.uses_teacher and cache is None:
        if not cfg.teacher_weights:
            raise ValueError(f"mode {cfg.mode!r} needs a teacher: --teacher-weights FILE or --teacher-cache PATH")
        teacher = load_weights(build_model(cfg.teacher, len(classes)), cfg.teacher_weights, name=cfg.teacher,
                               classes=classes)
    try:
        return run_training(cfg, train_loader, val_loader, classes=classes, teacher=teacher, resume=resume,
                            stop_after_steps=stop_after_steps, progress=progress)
    finally:
        if ddp_device is not None:
            dist.destroy_process_group()
