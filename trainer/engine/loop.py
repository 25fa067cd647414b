"""The epoch loop around `Distiller.step` (trainer/engine/step.py): run directory, epochs, evaluation, records,
checkpoints and exact resume.

`run_training` drives epochs over any iterable of `pipeline.core.batch.Batch` with `set_epoch(epoch, start_step)`
and `len()`. The host waits for the device only every `log_every` steps and at epoch end; at those points the
step log checks for non-finite losses, feeds TensorBoard, and the timer reads the step times.
"""
from __future__ import annotations

import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core.errors import KdpipeError, NonFiniteLossError
from pipeline.core.log import get_logger
from pipeline.core.progress import progress_bar, show_bar

from trainer.engine import checkpoint as ck
from trainer.config import TrainConfig, to_dict
from trainer.engine.evaluate import evaluate, format_table
from trainer.engine.interrupt import TrainingInterrupted, checkpoint_position
from trainer.engine.losses import term_keys
from trainer.engine.metrics import EpochMetrics, StudentMetrics
from trainer.engine.models import build_model
from trainer.engine.rundir import RunDir
from trainer.engine.runtime import all_gather_list, dist_info, resolve_device
from trainer.engine.step import Distiller, StepStats, step_seed

logger = get_logger(__name__)


class StepLog:
    """Each step's loss terms in a device ring buffer, read where the loop syncs anyway (at least every
    `capacity` steps): finds the first step whose terms were NaN/inf, naming student and term, at one small
    copy per step; and hands the host rows to TensorBoard."""

    def __init__(self, names: list[str], device: torch.device, capacity: int):
        self.names, self.capacity, self.terms = names, capacity, term_keys()
        self.rows = torch.zeros(capacity, len(names) * len(self.terms), device=device)
        self.steps: list[int] = []
        self.lrs: list[float] = []

    def observe(self, stats: StepStats, global_step: int, lr: float) -> None:
        if len(self.steps) == self.capacity:
            raise RuntimeError("StepLog.flush must run at least every `capacity` steps")
        n = stats.count.clamp(min=1.0)
        self.rows[len(self.steps)].copy_((stats.terms / n).flatten())
        self.steps.append(global_step)
        self.lrs.append(lr)

    def flush(self, run: Path, steps_per_epoch: int) -> tuple[list[int], np.ndarray, list[float]]:
        """(global steps, per-step term rows, lrs) since the last flush; NonFiniteLossError on a bad step."""
        n, steps, lrs = len(self.steps), self.steps, self.lrs
        self.steps, self.lrs = [], []
        rows = self.rows[:n].cpu().numpy()  # host sync
        bad = ~np.isfinite(rows)
        if bad.any():
            first = int(np.flatnonzero(bad.any(axis=1))[0])
            step, flags = steps[first], bad[first].reshape(len(self.names), len(self.terms))
            where = [f"student {i} ({self.names[i]}) term '{self.terms[j]}'" for i in range(len(self.names))
                     for j in range(len(self.terms)) if flags[i, j]]
            kept = run / ck.LAST
            raise NonFiniteLossError(
                f"non-finite loss at step {step} (epoch {step // steps_per_epoch}, step {step % steps_per_epoch} "
                f"of the epoch): {', '.join(where)}; last good checkpoint: {kept if kept.is_file() else 'none yet'}")
        return steps, rows, lrs


class StepTimer:
    """Where an epoch's time goes: the trainer waiting for the next batch vs the step itself. On CUDA the step
    is timed with events whose times are read at the loop's existing sync points (no sync added per step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.data_s = self.compute_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._t = 0.0

    def waited(self, seconds: float) -> None:
        self.data_s += seconds

    def start_step(self) -> None:
        if self.cuda:
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()
        else:
            self._t = time.perf_counter()

    def end_step(self) -> None:
        if self.cuda:
            self._events[-1][1].record()
        else:
            self.compute_s += time.perf_counter() - self._t

    def settle(self) -> None:
        """After a sync: add up the finished steps' GPU times."""
        for a, b in self._events:
            self.compute_s += a.elapsed_time(b) / 1000.0
        self._events = []


class Progress:
    """A tqdm bar per epoch on a terminal; plain lines (about ten an epoch) otherwise, so a log file gets no
    redraws (the terminal decision is pipeline/core/progress.py's `show_bar`); silent off rank 0 and under -q."""

    def __init__(self, epoch: int, epochs: int, total: int, start: int, enabled: bool):
        self.enabled, self.total, self.done = enabled, total, start
        self.bar = None
        self.desc = f"epoch {epoch + 1}/{epochs}"
        if show_bar(enabled):
            self.bar = progress_bar(total=total, initial=start, desc=self.desc, unit="step", leave=True)
        self.every_line = max(1, total // 10)

    def update(self, steps: int, info: str) -> None:
        before, self.done = self.done, self.done + steps
        if self.bar is not None:
            self.bar.set_postfix_str(info, refresh=False)
            self.bar.update(steps)
        elif self.enabled and (self.done // self.every_line != before // self.every_line or self.done == self.total):
            logger.info(f"{self.desc} step {self.done}/{self.total} {info}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def epoch_line(r: EpochMetrics, epochs: int) -> str:
    """One human line per epoch: losses, val top-1 per student (and ensemble), speed, data share."""
    parts = [f"epoch {r.epoch + 1}/{epochs}"]
    parts += [f"{s.name} loss {s.loss:.3f} val top-1 {s.val_top1:.2f}%" for s in r.students]
    if len(r.students) > 1:
        parts.append(f"ensemble {r.val_ensemble_top1:.2f}%")
    parts.append(f"{r.images_per_s:.0f} img/s, {r.epoch_time_s:.1f} s, data {100 * (r.data_share or 0):.0f} % of it")
    if r.skipped:
        parts.append(f"{r.skipped} corrupt samples skipped")
    return " | ".join(parts)


@dataclass
class Position:
    """Where the run is, and what a checkpoint must carry to continue it exactly."""

    epoch: int = 0
    step: int = 0  # steps done in `epoch`
    best: float = -1.0  # best ensemble (or single-student) val top-1 so far
    teacher_val: dict | None = None
    stats: StepStats | None = None  # sums of the epoch so far (global: reduced before saving)
    data_s: float = 0.0
    compute_s: float = 0.0
    skipped: list = field(default_factory=list)  # (id, reason) dropped this epoch so far


def _checkpoint(cfg: TrainConfig, classes: list[str], runtime: dict, pos: Position, distiller: Distiller) -> dict:
    return {"format": ck.CHECKPOINT_FORMAT, "config": to_dict(cfg), "runtime": runtime, "classes": list(classes),
            "epoch": pos.epoch, "step": pos.step, "best": pos.best, "teacher_val": pos.teacher_val,
            "accum": None if pos.stats is None else pos.stats.state(),
            "timing": [pos.data_s, pos.compute_s], "skipped": [[int(i), str(r)] for i, r in pos.skipped],
            **distiller.state_dict()}


def _position(state: dict, device: torch.device, rank: int) -> Position:
    accum = state.get("accum")
    # the saved partial-epoch sums are global (reduced before saving): rank 0 carries them
    stats = StepStats.from_state(accum, device) if isinstance(accum, dict) and rank == 0 else None
    data_s, compute_s = state.get("timing") or (0.0, 0.0)
    return Position(state["epoch"], state["step"], state["best"], state["teacher_val"], stats, data_s, compute_s,
                    [(int(i), str(r)) for i, r in state.get("skipped") or []] if rank == 0 else [])


def _skipped_since(loader, before: int) -> list[tuple[int, str]]:
    return list(getattr(loader, "skipped", [])[before:])


def run_training(cfg: TrainConfig, train_loader, val_loader, *, classes: list[str],
                 teacher: nn.Module | None = None, resume: bool = False, stop_after_steps: int | None = None,
                 progress: bool = True, runtime: dict | None = None) -> dict:
    """Train cfg.students on batches from train_loader; evaluate on val_loader every epoch.

    Holds RUN's lock (rank 0) for the whole run and writes RUN/config.json, metrics.jsonl, checkpoint-last.pt
    (every epoch, and at a stop), checkpoint-best.pt, skipped.tsv (with --skip-corrupt) and the students'
    final weights. `stop_after_steps` stops with a checkpoint once the run has trained that many global steps
    in all, those before a resume included (interruption for tests and preemption); a resumed checkpoint
    already there trains no step. Returns {"stopped", "epochs", "final": the last EpochMetrics, "teacher_val"}
    ({"stopped": True, "global_step", "trained_steps" (by this call), "teacher_val"} when stopped).
    """
    rank, _ = dist_info()
    run = RunDir(cfg.out)
    with run.lock() if rank == 0 else nullcontext():
        return _train(cfg, run, train_loader, val_loader, classes, teacher, resume, stop_after_steps, progress,
                      runtime or {"world_size": dist_info()[1]})


def _train(cfg: TrainConfig, run: RunDir, train_loader, val_loader, classes: list[str], teacher: nn.Module | None,
           resume: bool, stop_after_steps: int | None, progress: bool, runtime: dict) -> dict:
    device = resolve_device(cfg.device)
    rank, world = dist_info()
    state = run.open(cfg, classes, runtime, resume=resume, write=rank == 0)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise KdpipeError(f"the training loader yields no batches: {getattr(train_loader, 'num_samples', '?')} "
                          f"samples are fewer than one batch per rank (--batch-size {cfg.batch_size})")
    distiller = Distiller(cfg, [build_model(n, len(classes)) for n in cfg.students], teacher=teacher,
                          device=device, steps_per_epoch=steps_per_epoch)
    pos = Position()
    if state is not None:
        distiller.load_state_dict(state)
        pos = _position(state, device, rank)
        if rank == 0:
            run.truncate_metrics(pos.epoch)
    done = pos.epoch * steps_per_epoch + pos.step
    if stop_after_steps is not None and done >= stop_after_steps and pos.epoch < cfg.epochs:
        # N is the run's total: a checkpoint already there trains no step (the checkpoint is left as it is)
        return {"stopped": True, "global_step": done, "trained_steps": 0, "teacher_val": pos.teacher_val}
    if teacher is not None and pos.teacher_val is None:
        pos.teacher_val = evaluate([distiller.teacher], val_loader, device, amp_dtype=distiller.dtype)
    log = StepLog(distiller.names, device, capacity=cfg.log_every)
    tb = None
    if cfg.tensorboard and rank == 0:
        from trainer.engine.tb import TensorBoard

        tb = TensorBoard(run.path, distiller.names)

    saved = (pos.epoch, pos.step) if state is not None else None  # where checkpoint-last.pt is: told at Ctrl-C

    def save(path: Path) -> None:
        nonlocal saved
        if rank == 0:
            ck.atomic_torch_save(_checkpoint(cfg, classes, runtime, pos, distiller), path)
        saved = (pos.epoch, pos.step) if path.name == ck.LAST else saved

    record: EpochMetrics | None = None
    try:
        while pos.epoch < cfg.epochs:
            timing = _train_epoch(cfg, distiller, train_loader, pos, log, tb, run, steps_per_epoch,
                                  stop_after_steps, progress and rank == 0)
            if timing is None:  # stopped by stop_after_steps
                if world > 1:
                    pos.stats.all_reduce_()
                    distiller.sync_buffers()
                pos.skipped = all_gather_list(pos.skipped)
                save(run.path / ck.LAST)
                step = pos.epoch * steps_per_epoch + pos.step
                return {"stopped": True, "global_step": step, "trained_steps": step - done,
                        "teacher_val": pos.teacher_val}
            record = _finish_epoch(cfg, distiller, val_loader, pos, timing, device, world)
            improved = record.val_ensemble_top1 > pos.best  # a single student's own top-1 when alone
            pos.best = max(pos.best, record.val_ensemble_top1)
            if rank == 0:
                run.append_metrics(record)
                run.record_skipped(record.epoch, pos.skipped)
                if tb is not None:
                    tb.epoch(record)
                if progress:
                    logger.info(epoch_line(record, cfg.epochs))
            pos = Position(pos.epoch + 1, 0, pos.best, pos.teacher_val)  # the next epoch starts from nothing
            save(run.path / ck.LAST)
            if improved:
                save(run.path / ck.BEST)
    except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM, see trainer/engine/interrupt.py): say where to go on from
        raise TrainingInterrupted(checkpoint_position(saved, cfg.epochs, steps_per_epoch)) from e
    finally:
        if tb is not None:
            tb.close()
    if rank == 0:
        for i, (name, m) in enumerate(zip(distiller.names, distiller.students)):
            ck.save_final_weights(run.path, i, name, m.state_dict(), classes,
                                  view={"image_size": cfg.image_size, "val_resize": cfg.val_resize})
        if progress and record is not None:
            logger.info(format_table(distiller.names, _val_of(record)))
    return {"stopped": False, "epochs": cfg.epochs, "final": record, "teacher_val": pos.teacher_val}


def _train_epoch(cfg: TrainConfig, distiller: Distiller, loader, pos: Position, log: StepLog, tb, run: RunDir,
                 steps_per_epoch: int, stop_after_steps: int | None, show: bool) -> tuple[float, float] | None:
    """Steps from pos.step to the end of pos.epoch, updating pos. Returns (seconds, images) of this invocation's
    part of the epoch, or None when stopped by stop_after_steps."""
    device, (rank, world) = distiller.device, dist_info()
    loader.set_epoch(pos.epoch, start_step=pos.step)
    if pos.stats is None:
        pos.stats = StepStats.zeros(len(distiller.students), device)
    timer = StepTimer(device)
    timer.data_s, timer.compute_s = pos.data_s, pos.compute_s
    bar = Progress(pos.epoch, cfg.epochs, steps_per_epoch, pos.step, show)
    skipped_before = len(getattr(loader, "skipped", []))
    t0, last_log, images0 = time.perf_counter(), pos.step, pos.stats.count.item()
    it, stopped = iter(loader), False
    while not stopped:
        t_wait = time.perf_counter()
        batch = next(it, None)
        timer.waited(time.perf_counter() - t_wait)
        if batch is None:
            break
        global_step = pos.epoch * steps_per_epoch + pos.step
        if len(batch) == 0:  # every sample of the batch was corrupt and skipped: keep the schedule in step
            if world > 1:
                raise KdpipeError(f"a whole training batch of epoch {pos.epoch} was corrupt (step {pos.step}); "
                                  f"under torchrun every rank needs samples: fix the shards (kdpipe verify)")
            for sched in distiller.schedulers:
                sched.step()
        else:
            torch.manual_seed(step_seed(cfg.seed, global_step, rank))
            batch = batch.to(device)
            images = batch.images
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            timer.start_step()
            stats = distiller.step(images, batch.labels, batch.teacher_logits, batch.teacher_weight)
            timer.end_step()
            pos.stats.add_(stats)
            log.observe(stats, global_step, distiller.lr())
        pos.step += 1
        stopped = stop_after_steps is not None and global_step + 1 >= stop_after_steps
        if pos.step - last_log >= cfg.log_every or pos.step == steps_per_epoch or stopped:
            steps, rows, lrs = log.flush(run.path, steps_per_epoch)  # syncs
            timer.settle()
            if tb is not None:
                tb.steps(steps, rows, lrs)
            s = distiller.summarize(pos.stats)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            ips = (s["images"] - images0) * world / elapsed
            terms = " ".join(f"{x['loss']:.3f}" for x in s["students"])
            share = 100 * timer.data_s / max(timer.data_s + timer.compute_s, 1e-9)
            bar.update(pos.step - last_log, f"loss {terms} lr {distiller.lr():.4f} {ips:.0f} img/s, "
                                            f"data {share:.0f} % of step")
            last_log = pos.step
    bar.close()
    pos.data_s, pos.compute_s = timer.data_s, timer.compute_s
    pos.skipped += _skipped_since(loader, skipped_before)
    if stopped:
        return None
    if pos.step != steps_per_epoch:
        raise RuntimeError(f"the training loader yielded {pos.step} batches in epoch {pos.epoch}, len() said "
                           f"{steps_per_epoch}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timer.settle()
    pos.data_s, pos.compute_s = timer.data_s, timer.compute_s
    return time.perf_counter() - t0, pos.stats.count.item() - images0


def _finish_epoch(cfg: TrainConfig, distiller: Distiller, val_loader, pos: Position, timing: tuple[float, float],
                  device: torch.device, world: int) -> EpochMetrics:
    """The epoch's record: reduced training sums, timing, memory, then validation of every student."""
    epoch_time, images_timed = timing
    if world > 1:
        pos.stats.all_reduce_()
        distiller.sync_buffers()
    pos.skipped = all_gather_list(pos.skipped)
    s = distiller.summarize(pos.stats)
    val = evaluate(distiller.students, val_loader, device, amp_dtype=distiller.dtype,
                   channels_last=cfg.channels_last)
    students = [StudentMetrics.from_json({**x, "val_top1": val["top1"][i], "val_top5": val["top5"][i]})
                for i, x in enumerate(s["students"])]
    peak, kind = _peak_memory_mb(device)
    total = pos.data_s + pos.compute_s
    return EpochMetrics(
        epoch=pos.epoch, lr=distiller.lr(), images=s["images"], students=students,
        val_ensemble_top1=val["ensemble_top1"], val_ensemble_top5=val["ensemble_top5"], val_images=val["count"],
        w_mean=s["w_mean"], teacher_entropy_tau1=s["teacher_entropy_tau1"],
        teacher_entropy_tau=s["teacher_entropy_tau"],
        teacher_val=pos.teacher_val, skipped=len(pos.skipped), epoch_time_s=epoch_time,
        images_per_s=images_timed * world / max(epoch_time, 1e-9), data_time_s=pos.data_s,
        compute_time_s=pos.compute_s, data_share=pos.data_s / total if total > 0 else None,
        peak_mem_mb=peak, peak_mem_kind=kind)


def _val_of(r: EpochMetrics) -> dict:
    return {"top1": [s.val_top1 for s in r.students], "top5": [s.val_top5 for s in r.students],
            "ensemble_top1": r.val_ensemble_top1, "ensemble_top5": r.val_ensemble_top5, "count": r.val_images}
