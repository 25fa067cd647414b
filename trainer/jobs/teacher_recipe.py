"""The demo's teacher recipe: one model on hard labels, with what a demanding practitioner adds for a teacher
(label smoothing, zero-init residual BatchNorm; warm-up, lr, batch and a longer schedule come through the
TrainConfig), in its own small loop.

Why its own loop: the trainer's step (trainer/engine/step.py) computes every loss through `dual_student_loss`, the
students' objective, whose cross-entropy has no smoothing, and builds its models with the registry's
initialisation. Label smoothing belongs to the teacher only (a student's CE against the labels stays the
paper's), so rather than a LossConfig field that the students' step would have to ignore, the teacher gets
this loop. It writes the run directory `kdpipe train --mode hard` writes (config.json, metrics.jsonl,
checkpoint-last.pt after every epoch, student0-<name>.pt/.safetensors), so the report, cache-teacher and the
demo's resume read it unchanged; config.json's `runtime.teacher_recipe` records the two extras (and the
assumptions table shows them). One process, one device: no DDP.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ConfigError, KdpipeError
from pipeline.core.log import get_logger

from trainer.engine import checkpoint as ck
from trainer.config import TrainConfig, lr_factor, to_dict
from trainer.engine.evaluate import evaluate, format_table
from trainer.engine.graphed import GraphedStep, graphs_wanted
from trainer.engine.metrics import EpochMetrics, StudentMetrics
from trainer.engine.models import Residual, build_model
from trainer.engine.rundir import RunDir
from trainer.engine.runtime import autocast, precision_dtype, resolve_device
from trainer.engine.step import param_groups, step_seed

logger = get_logger(__name__)

RECIPE_KEY = "teacher_recipe"  # config.json: runtime.teacher_recipe.{label_smoothing, zero_init_residual}


def residual_gammas(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The last BatchNorm of each residual branch: torchvision's Bottleneck.bn3 and BasicBlock.bn2 (what
    resnet50(zero_init_residual=True) zeros) and the tiny models' Residual."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    out = []
    for m in model.modules():
        if isinstance(m, Bottleneck):
            out.append(m.bn3)
        elif isinstance(m, BasicBlock):
            out.append(m.bn2)
        elif isinstance(m, Residual):
            out.append(m.body[-1])
    return out


def zero_init_residual_(model: nn.Module, name: str) -> nn.Module:
    """Zero the gamma of the last BatchNorm in every residual branch, so each block starts as the identity
    (Goyal et al. 2017): the deep teacher trains stably from the first step at a high learning rate."""
    gammas = residual_gammas(model)
    if not gammas:
        raise ConfigError(f"teacher_zero_init_residual: {name} has no residual blocks kdpipe knows (torchvision "
                          f"ResNets, tiny_resnet); turn it off for this teacher")
    with torch.no_grad():
        for bn in gammas:
            bn.weight.zero_()
    return model


def teacher_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """The teacher's objective: cross-entropy with smoothed labels (1 - eps on the label, eps spread evenly),
    in float32. The students' losses (trainer/engine/losses.py) never see `label_smoothing`."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def recipe_record(label_smoothing: float, zero_init_residual: bool) -> dict:
    return {"label_smoothing": float(label_smoothing), "zero_init_residual": bool(zero_init_residual)}


def train_teacher(cfg: TrainConfig, *, label_smoothing: float = 0.0, zero_init_residual: bool = False,
                  progress: bool = True, stop_after_epochs: int | None = None) -> dict:
    """Train cfg.students[0] on hard labels (cfg: mode hard, one model) with the recipe; resumes at the last
    finished epoch when RUN/checkpoint-last.pt exists. `stop_after_epochs` stops once that many epochs are done
    (an interruption, for tests). Returns {"stopped", "epochs", "final": the last EpochMetrics}."""
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader

    if cfg.mode != "hard" or len(cfg.students) != 1 or not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"the teacher recipe trains one model with mode hard and label smoothing in [0, 1); got "
                          f"mode {cfg.mode}, models {','.join(cfg.students)}, label smoothing {label_smoothing}")
    device = resolve_device(cfg.device)
    spec = AugSpec(image_size=cfg.image_size, val_resize_mode=cfg.val_resize)
    common = dict(seed=cfg.seed, backend=cfg.backend, device=device, spec=spec, num_workers=cfg.num_workers,
                  skip_corrupt=cfg.skip_corrupt)
    val_loader = ImageNet100Loader(cfg.shards, "val", cfg.batch_size, drop_last=False, **common)
    train_loader = ImageNet100Loader(cfg.shards, "train", cfg.batch_size, **common)
    classes = list(val_loader.classes)
    recipe = recipe_record(label_smoothing, zero_init_residual)
    runtime = {"world_size": 1, "global_batch": cfg.batch_size, "per_rank_batch": cfg.batch_size,
               "cache_epochs": None, "views_per_sample": cfg.epochs, RECIPE_KEY: recipe}
    run = RunDir(cfg.out)
    with run.lock():
        state = run.open(cfg, classes, runtime, resume=(run.path / ck.LAST).is_file(), write=True)
        if state is not None and (state.get("runtime") or {}).get(RECIPE_KEY) != recipe:
            raise ConfigError(f"{run.path / ck.LAST} was trained with the teacher recipe "
                              f"{(state.get('runtime') or {}).get(RECIPE_KEY)}, not {recipe}; use another --out")
        return _epochs(cfg, run, train_loader, val_loader, classes, device, state, label_smoothing,
                       zero_init_residual, runtime, progress, stop_after_epochs)


def _epochs(cfg: TrainConfig, run: RunDir, train_loader, val_loader, classes: list[str], device: torch.device,
            state: dict | None, label_smoothing: float, zero_init_residual: bool, runtime: dict,
            progress: bool, stop_after_epochs: int | None) -> dict:
    name, steps = cfg.students[0], len(train_loader)
    if steps == 0:
        raise KdpipeError(f"the teacher's training loader yields no batches: fewer samples than --batch-size "
                          f"{cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    model = build_model(name, len(classes))
    if zero_init_residual:
        zero_init_residual_(model, name)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    o, dtype = cfg.optim, precision_dtype(cfg.amp, device)
    opt = torch.optim.SGD(param_groups(model, o.weight_decay, o.decay_norm_and_bias), lr=o.lr, momentum=o.momentum,
                          nesterov=o.nesterov, fused=True if device.type == "cuda" else None)
    total, warmup = cfg.epochs * steps, round(o.warmup_epochs * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    start = 0
    if state is not None:
        entry = state["students"][0]
        model.load_state_dict(entry["model"])
        opt.load_state_dict(entry["optimizer"])
        sched.load_state_dict(entry["scheduler"])
        if scaler is not None and entry.get("scaler") is not None:
            scaler.load_state_dict(entry["scaler"])
        start = int(state["epoch"])
        run.truncate_metrics(start)
    step = _step(model, opt, scaler, device, dtype, label_smoothing)
    if graphs_wanted(cfg.cuda_graphs, device=device, dtype=dtype, world_size=1):
        step = GraphedStep(step, [opt], device)  # the trainer's whole-step CUDA graph (trainer/engine/graphed.py)
    record = None
    for epoch in range(start, cfg.epochs):
        record = _one_epoch(cfg, model, step, sched, train_loader, val_loader, epoch, steps, device, dtype)
        run.append_metrics(record)
        if progress:
            logger.info(f"[teacher] epoch {epoch + 1}/{cfg.epochs}: loss {record.students[0].loss:.3f}, val top-1 "
                     f"{record.val_ensemble_top1:.2f} %, {record.images_per_s:.0f} img/s")
        ck.atomic_torch_save({"format": ck.CHECKPOINT_FORMAT, "config": to_dict(cfg), "runtime": runtime,
                              "classes": classes, "epoch": epoch + 1, "step": 0, "best": -1.0, "teacher_val": None,
                              "accum": None, "timing": [0.0, 0.0], "skipped": [],
                              "students": [{"name": name, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                            "scheduler": sched.state_dict(),
                                            "scaler": None if scaler is None else scaler.state_dict()}]},
                             run.path / ck.LAST)
        if stop_after_epochs is not None and epoch + 1 >= stop_after_epochs and epoch + 1 < cfg.epochs:
            return {"stopped": True, "epochs": epoch + 1, "final": record}
    ck.save_final_weights(run.path, 0, name, model.state_dict(), classes,
                          view={"image_size": cfg.image_size, "val_resize": cfg.val_resize})
    if progress and record is not None:
        logger.info(format_table([name], {"top1": [record.val_ensemble_top1], "top5": [record.val_ensemble_top5],
                                       "ensemble_top1": None, "ensemble_top5": None, "count": record.val_images}))
    return {"stopped": False, "epochs": cfg.epochs, "final": record}


def _step(model: nn.Module, opt, scaler, device: torch.device, dtype: torch.dtype | None,
          label_smoothing: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One optimisation step of the teacher on (images, labels), without a host sync: returns (objective, plain CE,
    correct, count) x batch as a float64 device tensor. What a CUDA graph captures."""

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype, cache=False):
            logits = model(images)
        loss = teacher_loss(logits, labels, label_smoothing)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        with torch.no_grad():
            z, n = logits.detach().float(), labels.new_full((), labels.shape[0], dtype=torch.float32)
            return torch.stack([loss.detach() * n, F.cross_entropy(z, labels) * n,
                                (z.argmax(-1) == labels).sum().float(), n]).double()

    return step


def _one_epoch(cfg: TrainConfig, model: nn.Module, step, sched, loader, val_loader, epoch: int, steps: int,
               device: torch.device, dtype: torch.dtype | None) -> EpochMetrics:
    """One epoch of the teacher and its validation. Sums stay on the device until the epoch ends."""
    loader.set_epoch(epoch)
    model.train()
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # objective, plain CE, correct, count (x batch)
    t0 = time.perf_counter()
    for k, batch in enumerate(loader):
        if not len(batch):  # a wholly corrupt batch under --skip-corrupt: keep the schedule in step
            sched.step()
            continue
        torch.manual_seed(step_seed(cfg.seed, epoch * steps + k))  # dropout masks independent of resumes
        batch = batch.to(device)
        images = batch.images.contiguous(memory_format=torch.channels_last) if cfg.channels_last else batch.images
        sums += step(images, batch.labels)  # a graph's static output: added before the next step
        sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    objective, hard, correct, count = sums.tolist()
    if not math.isfinite(objective):
        raise KdpipeError(f"the teacher {cfg.students[0]} diverged in epoch {epoch} (non-finite loss); lower the "
                          f"teacher's lr or lengthen its warm-up ({cfg.out})")
    val = evaluate([model], val_loader, device, amp_dtype=dtype, channels_last=cfg.channels_last)
    count = max(count, 1.0)
    student = StudentMetrics(cfg.students[0], loss=objective / count, w=None, train_acc=100.0 * correct / count,
                             val_top1=val["top1"][0], val_top5=val["top5"][0],
                             terms={"hard": hard / count, "teacher": 0.0, "peer": 0.0})
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    lr = sched.optimizer.param_groups[0]["lr"]
    return EpochMetrics(epoch=epoch, lr=lr, images=int(count), students=[student],
                        val_ensemble_top1=val["top1"][0], val_ensemble_top5=val["top5"][0], val_images=val["count"],
                        epoch_time_s=seconds, images_per_s=count / max(seconds, 1e-9),
                        peak_mem_mb=peak, peak_mem_kind="cuda_max_allocated" if peak is not None else None)
