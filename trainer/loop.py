"""The training step for N students and the epoch loop around it.

`Distiller.step` is the hot loop: teacher forward (or cached logits), student forwards under
autocast, the loss dict per student in float32, one backward, one optimizer (and GradScaler) per
student. It returns its statistics as one device tensor, so nothing waits for the GPU until a
progress update asks for numbers. `run_training` drives epochs over any iterable of
`pipeline.batch.Batch` with `set_epoch(epoch, start_step)` and `len()`: metrics, checkpoints, resume.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.errors import KdpipeError, MissingDataError, OutputExistsError

from . import checkpoint as ck
from .config import TrainConfig, amp_dtype, lr_factor, resolve_device, resume_mismatches, to_dict, to_json
from .evaluate import autocast_for, evaluate, format_table
from .losses import dual_student_loss, entropy, entropy_weight
from .models import build_model

TERMS = ("loss", "hard", "teacher", "peer", "w")  # per student, in the stats vector


class NonFiniteLossError(KdpipeError, FloatingPointError):
    """A loss term became NaN or inf; names the step and the term."""


def step_seed(seed: int, global_step: int) -> int:
    """Seed of the global RNG (dropout) at each step: a resumed run draws the same masks without
    depending on what the loader or evaluation consumed from the RNG in between."""
    return (seed * 1_000_003 + global_step) % (2**63)


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Distiller:
    """N students, their optimizers, schedules and scalers, the optional online teacher, and the step."""

    def __init__(self, cfg: TrainConfig, students: Sequence[nn.Module], *, teacher: nn.Module | None,
                 device: torch.device, steps_per_epoch: int):
        self.cfg, self.device, self.names = cfg, device, list(cfg.students)
        self.dtype = amp_dtype(cfg.amp, device)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.students = [m.to(device, memory_format=fmt).train() for m in students]
        self.teacher = None if teacher is None else teacher.to(device, memory_format=fmt).eval().requires_grad_(False)
        rank, world = dist_info()
        self.forward = [DDP(m, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else m
                        for m in self.students]
        if cfg.compile:
            self.forward = [torch.compile(m) for m in self.forward]
        o = cfg.optim
        # fused SGD on CUDA: one kernel per step, and GradScaler hands it found_inf instead of syncing on it
        fused = True if device.type == "cuda" else None
        self.optimizers = [torch.optim.SGD(m.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                           nesterov=o.nesterov, fused=fused) for m in self.students]
        total, warmup = cfg.epochs * steps_per_epoch, round(o.warmup_epochs * steps_per_epoch)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
                           for opt in self.optimizers]
        fp16 = self.dtype == torch.float16
        self.scalers = [torch.amp.GradScaler(device.type) if fp16 else None for _ in self.students]

    @property
    def stats_size(self) -> int:
        return len(self.students) * (len(TERMS) + 1) + 3  # terms + correct per student; H1, Htau, count

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_for(self.device, self.dtype):
            return self.teacher(images).float()

    def step(self, images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
             teacher_weight: torch.Tensor | None = None) -> torch.Tensor:
        """One optimisation step of every student; returns the stats vector (device, no sync).

        Layout: per student [loss, hard, teacher, peer, w] * n, then correct counts per student,
        then sum of teacher entropy at tau=1 and at tau, then n (the batch size)."""
        lc = self.cfg.loss
        if lc.beta != 0.0 and teacher_logits is None:
            if self.teacher is None:
                raise ValueError("this mode needs teacher logits: an online teacher or a teacher cache")
            teacher_logits = self.teacher_logits(images)
        if lc.beta == 0.0:
            teacher_logits = None
        weight, h1 = None, None
        if teacher_logits is not None:  # teacher statistics once per batch, shared by every student's loss
            h1 = entropy(teacher_logits, 1.0)
            if lc.uncertainty:
                # a cached w was computed at tau = 1; use it only when that is the configured temperature
                if lc.entropy_tau != 1.0:
                    weight = entropy_weight(teacher_logits, lc.entropy_tau)
                else:
                    weight = teacher_weight if teacher_weight is not None else \
                        1.0 - h1 / math.log(teacher_logits.shape[-1])
        with autocast_for(self.device, self.dtype):
            logits = [m(images) for m in self.forward]
        rows, total = [], 0.0
        for i, z in enumerate(logits):
            peers = [p for j, p in enumerate(logits) if j != i] if lc.gamma != 0.0 else None
            t = dual_student_loss(z, peers, teacher_logits, labels, alpha=lc.alpha, beta=lc.beta, gamma=lc.gamma,
                                  tau=lc.tau, uncertainty=lc.uncertainty, direction=lc.direction,
                                  entropy_tau=lc.entropy_tau, weight=weight)
            scaler = self.scalers[i]
            total = total + (scaler.scale(t["loss"]) if scaler is not None else t["loss"])
            rows.append(torch.stack([t[k].detach() for k in TERMS]))
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        # The peer targets are detached and the teacher has no grad, so d(sum L_i)/d(theta_i) = dL_i/d(theta_i):
        # one backward serves all students (and lets DDP overlap their all-reduces).
        total.backward()
        for opt, scaler, sched in zip(self.optimizers, self.scalers, self.schedulers):
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
        n = labels.new_full((), labels.shape[0], dtype=torch.float32)  # a fill kernel, not a host->device copy
        correct = torch.stack([(z.detach().argmax(dim=-1) == labels).sum() for z in logits]).float()
        if h1 is not None:
            ent = torch.stack([h1.sum(), entropy(teacher_logits, lc.tau).sum()])
        else:
            ent = n.new_zeros(2)
        return torch.cat([torch.stack(rows).flatten() * n, correct, ent, n[None]])

    def summarize(self, stats: torch.Tensor) -> dict:
        """Per-sample means from a summed stats vector (host side)."""
        s, k = len(self.students), len(TERMS)
        v = stats.tolist()
        n = max(v[-1], 1.0)
        out = {"images": int(v[-1])}
        for i, name in enumerate(self.names):
            out[f"s{i}"] = {"name": name, **{t: v[i * k + j] / n for j, t in enumerate(TERMS)},
                            "train_acc": 100.0 * v[s * k + i] / n}
        teacher = self.cfg.uses_teacher
        if not teacher:  # no teacher term: there is no weight to report
            for i in range(s):
                out[f"s{i}"]["w"] = None
        out["w_mean"] = out["s0"]["w"]
        out["teacher_entropy_tau1"] = v[-3] / n if teacher else None
        out["teacher_entropy_tau"] = v[-2] / n if teacher else None
        return out

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics everywhere: DDP broadcasts buffers before each forward, so after
        the last step each rank holds its own; evaluation and checkpoints must see one model."""
        for m in self.students:
            for b in m.buffers():
                dist.broadcast(b, 0)

    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"students": [{"name": name, "model": m.state_dict(), "optimizer": o.state_dict(),
                              "scheduler": sc.state_dict(), "scaler": None if g is None else g.state_dict()}
                             for name, m, o, sc, g in zip(self.names, self.students, self.optimizers,
                                                           self.schedulers, self.scalers)]}

    def load_state_dict(self, state: dict) -> None:
        for entry, m, o, sc, g in zip(state["students"], self.students, self.optimizers, self.schedulers,
                                      self.scalers):
            m.load_state_dict(entry["model"])
            o.load_state_dict(entry["optimizer"])
            sc.load_state_dict(entry["scheduler"])
            if g is not None and entry["scaler"] is not None:
                g.load_state_dict(entry["scaler"])


class Progress:
    """A tqdm bar per epoch on a terminal; plain lines (about ten an epoch) otherwise; silent off rank 0."""

    def __init__(self, epoch: int, epochs: int, total: int, start: int, enabled: bool):
        self.enabled, self.tty, self.total, self.done = enabled, sys.stderr.isatty(), total, start
        self.bar = None
        self.desc = f"epoch {epoch + 1}/{epochs}"
        if enabled and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=self.desc, unit="step", leave=True)
        self.every_line = max(1, total // 10)

    def update(self, steps: int, info: str) -> None:
        before, self.done = self.done, self.done + steps
        if self.bar is not None:
            self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(steps)
        elif self.enabled and (self.done // self.every_line != before // self.every_line or self.done == self.total):
            print(f"{self.desc} step {self.done}/{self.total} {info}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


class NanWatch:
    """Finds the first step whose loss terms were NaN/inf and names the terms, at one copy per step:
    each step's terms go into a device ring buffer, and `check` (called where the loop syncs anyway, at
    least every `capacity` steps) reads the rows written since the last check."""

    def __init__(self, names: list[str], device: torch.device, capacity: int):
        self.names, self.capacity = names, capacity
        self.rows = torch.zeros(capacity, len(names) * len(TERMS), device=device)
        self.steps: list[int] = []

    def observe(self, stats: torch.Tensor, global_step: int) -> None:
        if len(self.steps) == self.capacity:
            raise RuntimeError("NanWatch.check must run at least every `capacity` steps")
        self.rows[len(self.steps)].copy_(stats[:self.rows.shape[1]])
        self.steps.append(global_step)

    def check(self, run: Path, steps_per_epoch: int) -> None:
        n, steps, self.steps = len(self.steps), self.steps, []
        if n == 0:
            return
        bad = ~torch.isfinite(self.rows[:n])
        bad_rows = bad.any(dim=1).tolist()  # host sync
        if not any(bad_rows):
            return
        first = bad_rows.index(True)
        step, flags = steps[first], bad[first].view(len(self.names), len(TERMS)).tolist()
        where = [f"student {i} ({self.names[i]}) term '{TERMS[j]}'" for i in range(len(self.names))
                 for j in range(len(TERMS)) if flags[i][j]]
        kept = run / ck.LAST
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (epoch {step // steps_per_epoch}, step {step % steps_per_epoch} of "
            f"the epoch): {', '.join(where)}; last good checkpoint: {kept if kept.is_file() else 'none yet'}")


def epoch_line(r: dict, num_students: int, epochs: int) -> str:
    """One human line per epoch: losses, val top-1 per student (and ensemble), speed."""
    parts = [f"epoch {r['epoch'] + 1}/{epochs}"]
    for i in range(num_students):
        s = r[f"s{i}"]
        parts.append(f"{s['name']} loss {s['loss']:.3f} val top-1 {s['val_top1']:.2f}%")
    if num_students > 1:
        parts.append(f"ensemble {r['val_ensemble_top1']:.2f}%")
    parts.append(f"{r['images_per_s']:.0f} img/s, {r['epoch_time_s']:.1f} s")
    return " | ".join(parts)


def _open_run(cfg: TrainConfig, classes: list[str], resume: bool, rank: int) -> dict | None:
    """Create RUN (config.json) or, with resume, load and check RUN/checkpoint-last.pt."""
    run = Path(cfg.out)
    last = run / ck.LAST
    if not resume:
        if last.is_file():
            raise OutputExistsError(f"{run} already holds a run ({last}); pass --resume or choose another --out")
        if rank == 0:
            ck.atomic_write_bytes(run / ck.CONFIG, to_json(cfg).encode())
        return None
    if not last.is_file():
        raise MissingDataError(f"--resume: no checkpoint at {last}")
    state = ck.load_checkpoint(last)
    diff = resume_mismatches(state["config"], cfg)
    if diff:
        raise ValueError(f"{last} was written by another config; differing fields: {'; '.join(diff)}")
    if list(state["classes"]) != list(classes):
        raise ValueError(f"{last} was trained on other classes than the shards' {len(classes)}")
    return state


def run_training(cfg: TrainConfig, train_loader, val_loader, *, classes: list[str],
                 teacher: nn.Module | None = None, resume: bool = False, stop_after_steps: int | None = None,
                 progress: bool = True) -> dict:
    """Train cfg.students on batches from train_loader; evaluate on val_loader every epoch.

    Writes RUN/config.json, metrics.jsonl, checkpoint-last.pt (every epoch, and at a stop),
    checkpoint-best.pt (best ensemble top-1) and the students' final weights. `stop_after_steps`
    stops after that many global steps with a checkpoint (interruption for tests and preemption).
    Returns {"stopped", "epochs", "final": last epoch's metrics, "teacher_val"}.
    """
    device = resolve_device(cfg.device)
    rank, world = dist_info()
    run = Path(cfg.out)
    state = _open_run(cfg, classes, resume, rank)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches (fewer samples than one batch per rank?)")
    distiller = Distiller(cfg, [build_model(n, len(classes)) for n in cfg.students], teacher=teacher,
                          device=device, steps_per_epoch=steps_per_epoch)
    epoch, start_step, best, teacher_val, acc = 0, 0, -1.0, None, None
    if state is not None:
        distiller.load_state_dict(state)
        epoch, start_step, best, teacher_val = state["epoch"], state["step"], state["best"], state["teacher_val"]
        # the saved partial-epoch sums are global (reduced before saving): rank 0 carries them
        acc = state["accum"].to(device) if state["accum"] is not None and rank == 0 else None
        if rank == 0:
            ck.truncate_metrics(run, epoch)
    if teacher is not None and teacher_val is None:
        teacher_val = evaluate([distiller.teacher], val_loader, device, amp_dtype=distiller.dtype)
    watch = NanWatch(distiller.names, device, capacity=cfg.log_every)

    def save(path: Path, epoch_: int, step_: int, accum: torch.Tensor | None) -> None:
        if rank == 0:
            ck.atomic_torch_save({"format": ck.CHECKPOINT_FORMAT, "config": to_dict(cfg), "classes": list(classes),
                                  "epoch": epoch_, "step": step_, "best": best, "teacher_val": teacher_val,
                                  "accum": None if accum is None else accum.cpu(), **distiller.state_dict()}, path)

    record: dict = {}
    while epoch < cfg.epochs:
        train_loader.set_epoch(epoch, start_step=start_step)
        if acc is None:
            acc = torch.zeros(distiller.stats_size, device=device)
        bar = Progress(epoch, cfg.epochs, steps_per_epoch, start_step, progress and rank == 0)
        t0, step, last_log, images0 = time.perf_counter(), start_step, start_step, acc[-1].item()
        for batch in train_loader:
            global_step = epoch * steps_per_epoch + step
            torch.manual_seed(step_seed(cfg.seed, global_step))
            batch = batch.to(device)
            images = batch.images
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            stats = distiller.step(images, batch.labels, batch.teacher_logits, batch.teacher_weight)
            acc += stats
            watch.observe(stats, global_step)
            step += 1
            stop = stop_after_steps is not None and global_step + 1 >= stop_after_steps
            if step - last_log >= cfg.log_every or step == steps_per_epoch or stop:
                watch.check(run, steps_per_epoch)  # syncs
                s = distiller.summarize(acc)
                ips = (s["images"] - images0) * world / max(time.perf_counter() - t0, 1e-9)
                terms = " ".join(f"{s[f's{i}']['loss']:.3f}" for i in range(len(cfg.students)))
                bar.update(step - last_log, f"loss {terms} lr {distiller.lr():.4f} {ips:.0f} img/s")
                last_log = step
            if stop:
                bar.close()
                if world > 1:
                    dist.all_reduce(acc)
                    distiller.sync_buffers()
                save(run / ck.LAST, epoch, step, acc)
                return {"stopped": True, "global_step": global_step + 1, "teacher_val": teacher_val}
        bar.close()
        watch.check(run, steps_per_epoch)
        if step != steps_per_epoch:
            raise RuntimeError(f"the training loader yielded {step} batches in epoch {epoch}, len() said "
                               f"{steps_per_epoch}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - t0
        if world > 1:
            dist.all_reduce(acc)
            distiller.sync_buffers()
        record = {"epoch": epoch, "lr": distiller.lr(), **distiller.summarize(acc)}
        record["epoch_time_s"] = epoch_time
        record["images_per_s"] = (record["images"] - images0) / max(epoch_time, 1e-9)
        record["peak_mem_mb"], record["peak_mem_kind"] = _peak_memory_mb(device)
        val = evaluate(distiller.students, val_loader, device, amp_dtype=distiller.dtype,
                       channels_last=cfg.channels_last)
        for i in range(len(cfg.students)):
            record[f"s{i}"].update(val_top1=val["top1"][i], val_top5=val["top5"][i])
        record.update(val_ensemble_top1=val["ensemble_top1"], val_ensemble_top5=val["ensemble_top5"],
                      val_images=val["count"], teacher_val=teacher_val)
        epoch, start_step, acc = epoch + 1, 0, None
        improved = record["val_ensemble_top1"] > best
        best = max(best, record["val_ensemble_top1"])
        if rank == 0:
            ck.write_metrics_line(run, record)
            if progress:
                print(epoch_line(record, len(cfg.students), cfg.epochs), file=sys.stderr, flush=True)
            save(run / ck.LAST, epoch, 0, None)
            if improved:
                save(run / ck.BEST, epoch, 0, None)
    if rank == 0:
        for i, (name, m) in enumerate(zip(distiller.names, distiller.students)):
            ck.save_final_weights(run, i, name, m.state_dict(), classes)
        if progress and record:
            val = {"top1": [record[f"s{i}"]["val_top1"] for i in range(len(cfg.students))],
                   "top5": [record[f"s{i}"]["val_top5"] for i in range(len(cfg.students))],
                   "ensemble_top1": record["val_ensemble_top1"], "ensemble_top5": record["val_ensemble_top5"],
                   "count": record["val_images"]}
            print(format_table(distiller.names, val), flush=True)
    return {"stopped": False, "epochs": cfg.epochs, "final": record, "teacher_val": teacher_val}

