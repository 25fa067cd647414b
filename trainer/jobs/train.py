"""The `kdpipe train` job: loaders over the shards, the teacher (online or from a cache), DDP under torchrun.

Thin on purpose: everything that trains lives in trainer/engine/loop.py and works with any Batch iterable.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection

import torch.distributed as dist

from pipeline.core.errors import ConfigError

from trainer.config import TrainConfig
from trainer.engine.graphed import graphs_wanted
from trainer.engine.loop import run_training
from trainer.engine.models import check_model_names, check_one_sample_batches
from trainer.engine.runtime import dist_info, init_distributed, load_teacher, precision_dtype


def per_rank_batch(global_batch: int, world: int, flag: str = "--batch-size") -> int:
    """The global batch split across `world` ranks; a ConfigError naming both numbers if it does not divide."""
    if global_batch % world:
        raise ConfigError(f"{flag} {global_batch} (the global batch) does not split evenly across {world} ranks; "
                          f"use a multiple of {world}")
    return global_batch // world


def views_per_sample(epochs: int, cache_epochs: int | None) -> int:
    """Distinct views each training sample gets in a run: one per epoch, or E when a cache of E augmentation
    epochs is reused (training epoch e shows the view of epoch e mod E)."""
    return epochs if cache_epochs is None else min(epochs, cache_epochs)


def train(cfg: TrainConfig, *, resume: bool = False, stop_after_steps: int | None = None,
          progress: bool = True, given_inputs: Collection[str] | None = None) -> dict:
    """The `kdpipe train` job: loaders over cfg.shards, the teacher (online or cached), run_training.

    With resume, the inputs the run recorded are checked as soon as each is read (the shards before the cache
    and the teacher are made for their classes), so the one that differs is named, not what it breaks later;
    `given_inputs`: those named on the command line (None: all), see trainer.engine.inputs.check_inputs."""
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader
    from pipeline.core.outdir import refuse_inside

    from trainer.engine.evaluate import require_train_samples, require_val_samples
    from trainer.engine.inputs import absolute_paths, input_record
    from trainer.engine.rundir import RunDir

    check_model_names(cfg.students)
    cfg = absolute_paths(cfg)  # recorded so: a run read from another directory finds the same inputs
    refuse_inside(cfg.out, [("--shards", cfg.shards), ("--teacher-cache", cfg.teacher_cache)])
    RunDir(cfg.out).is_run()  # a directory kdpipe did not make is refused before anything is loaded
    device, created = init_distributed(cfg.device)
    try:
        cfg = dataclasses.replace(cfg, device=str(device)) if created else cfg
        rank, world = dist_info()
        batch = per_rank_batch(cfg.batch_size, world)
        # resolved now: `--cuda-graphs on` where graphs cannot apply is refused before any data is read
        graphs = graphs_wanted(cfg.cuda_graphs, device=device, dtype=precision_dtype(cfg.amp, device),
                               world_size=world, compile_mode=cfg.compile)
        spec = AugSpec(image_size=cfg.image_size, val_resize_mode=cfg.val_resize, **cfg.view.spec_fields())
        common = dict(seed=cfg.seed, backend=cfg.backend, device=device, spec=spec, rank=rank, world_size=world,
                      num_workers=cfg.num_workers, skip_corrupt=cfg.skip_corrupt, decode_device=cfg.decode_device)
        val_loader = ImageNet100Loader(cfg.shards, "val", batch, drop_last=False, **common)
        require_val_samples(val_loader, cfg.shards)
        if resume:
            RunDir(cfg.out).check_inputs(input_record(shards=cfg.shards, manifest_sha256=val_loader.manifest_sha256),
                                         only=("shards",), given=given_inputs)
        classes = list(val_loader.classes)
        if batch == 1:  # drop_last: every training batch has exactly `batch` samples
            check_one_sample_batches(cfg.students, len(classes), cfg.image_size, f"--batch-size {cfg.batch_size}")
        cache = open_training_cache(cfg, val_loader, spec) if cfg.teacher_cache else None
        cache_epochs = None if cache is None else cache.epochs
        # the cache gives logits only to teacher modes; a `hard` run given one only repeats its views like them
        train_loader = ImageNet100Loader(cfg.shards, "train", batch, **common,
                                         teacher_cache=cache if cfg.uses_teacher else None,
                                         view_epochs=cache_epochs)
        require_train_samples(train_loader, cfg.shards)
        teacher = None
        if cfg.uses_teacher and cache is None:
            if not cfg.teacher_weights:
                raise ConfigError(f"mode {cfg.mode!r} needs a teacher: --teacher-weights FILE or --teacher-cache PATH")
            teacher = load_teacher(cfg.teacher, cfg.teacher_weights, classes, device, cfg.channels_last)
        inputs = input_record(shards=cfg.shards, manifest_sha256=val_loader.manifest_sha256,
                              teacher_cache=cfg.teacher_cache, cache_fingerprint=getattr(cache, "fingerprint", None),
                              teacher_weights=cfg.teacher_weights)
        if resume:
            RunDir(cfg.out).check_inputs(inputs, given=given_inputs)
        runtime = {"world_size": world, "global_batch": cfg.batch_size, "per_rank_batch": batch,
                   "cache_epochs": cache_epochs, "views_per_sample": views_per_sample(cfg.epochs, cache_epochs),
                   "inputs": inputs, "cuda_graphs": graphs, "decode_device": train_loader.decode_device,
                   "prefetch": train_loader.prefetch}
        return run_training(cfg, train_loader, val_loader, classes=classes, teacher=teacher, resume=resume,
                            stop_after_steps=stop_after_steps, progress=progress, runtime=runtime)
    finally:
        if created:
            dist.destroy_process_group()


def open_training_cache(cfg: TrainConfig, loader, spec):
    """The teacher cache, refused unless made for these shards, classes, views and seed, complete and undamaged,
    and with at least --epochs augmentation epochs (fewer only with --reuse-views)."""
    from pipeline.cache.store import validate_cache_for_training

    cache = validate_cache_for_training(cfg.teacher_cache, loader=loader, spec=spec, seed=cfg.seed,
                                        image_size=cfg.image_size)
    if cache.epochs < cfg.epochs and not cfg.reuse_views:
        raise ConfigError(f"teacher cache {cfg.teacher_cache} holds {cache.epochs} augmentation epoch(s) but the run "
                          f"trains {cfg.epochs} epochs: views would repeat (epoch e trains on the views of epoch e "
                          f"mod {cache.epochs}, each up to {-(-cfg.epochs // cache.epochs)} times). Make a cache "
                          f"with `kdpipe cache-teacher --epochs {cfg.epochs}`, or pass "
                          f"--reuse-views to accept the repetition (recorded in config.json and the report)")
    return cache
