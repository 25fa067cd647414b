"""The training step for N students: `Distiller.step` is the hot loop.

Teacher forward (or cached logits), student forwards under autocast, the loss dict per student in float32,
one backward, one optimizer (and GradScaler) per student. Statistics stay on the device as named tensors
(`StepStats`), so nothing waits for the GPU until a progress update asks for numbers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.config import TrainConfig, lr_factor
from trainer.engine.graphed import GraphedStep, graphs_wanted
from trainer.engine.losses import distill_loss, entropy, teacher_weight, term_keys
from trainer.engine.runtime import (all_reduce_sum_, autocast, broadcast_from_rank0_, dist_info, precision_dtype,
                                    teacher_forward)


def step_seed(seed: int, global_step: int, rank: int = 0) -> int:
    """Seed of the global RNG (dropout) at each step on each rank: a resumed run draws the same masks without
    depending on what the loader or evaluation consumed in between, and ranks draw different masks (with
    (seed, step) alone every rank would drop the same units)."""
    return ((seed * 1_000_003 + global_step) * 65_537 + rank) % (2**63)


def set_dropout(model: nn.Module, p: float | None) -> nn.Module:
    """Every nn.Dropout of `model` at probability p (MobileNetV2's classifier; ResNets have none); None keeps
    each model's own."""
    if p is None:
        return model
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    return model


@dataclass
class StepStats:
    """Sums over steps, on the device: per student the loss terms (term_keys() order) times the batch size and the
    correct count; the teacher entropies at tau = 1 and at tau (summed over samples); the sample count."""

    terms: torch.Tensor  # (students, len(term_keys()))
    correct: torch.Tensor  # (students,)
    entropy: torch.Tensor  # (2,): tau = 1, tau
    count: torch.Tensor  # ()

    @classmethod
    def zeros(cls, students: int, device: torch.device) -> "StepStats":
        z = torch.zeros
        return cls(z(students, len(term_keys()), device=device), z(students, device=device), z(2, device=device),
                   z((), device=device))

    def add_(self, other: "StepStats") -> "StepStats":
        for f in fields(self):
            getattr(self, f.name).add_(getattr(other, f.name))
        return self

    def all_reduce_(self) -> "StepStats":
        all_reduce_sum_(*(getattr(self, f.name) for f in fields(self)))
        return self

    def state(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).detach().cpu() for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], device: torch.device) -> "StepStats":
        return cls(**{k: v.to(device) for k, v in state.items()})


class Distiller:
    """N students, their optimizers, schedules and scalers, the optional online teacher, and the step."""

    def __init__(self, cfg: TrainConfig, students: Sequence[nn.Module], *, teacher: nn.Module | None,
                 device: torch.device, steps_per_epoch: int):
        self.cfg, self.device, self.names = cfg, device, list(cfg.students)
        self.dtype = precision_dtype(cfg.amp, device)
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.students = [set_dropout(m, cfg.dropout).to(device, memory_format=fmt).train() for m in students]
        self.teacher = None if teacher is None else teacher.to(device, memory_format=fmt).eval().requires_grad_(False)
        _, world = dist_info()
        self.forward = [DDP(m, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else m
                        for m in self.students]
        if cfg.compile != "off":
            mode = None if cfg.compile == "default" else cfg.compile
            self.forward = [torch.compile(m, mode=mode) for m in self.forward]
        o = cfg.optim
        # fused SGD on CUDA: one kernel per step, and GradScaler hands it found_inf instead of syncing on it
        fused = True if device.type == "cuda" else None
        self.optimizers = [torch.optim.SGD(param_groups(m, o.weight_decay, o.decay_norm_and_bias), lr=o.lr,
                                           momentum=o.momentum, nesterov=o.nesterov, fused=fused)
                           for m in self.students]
        total, warmup = cfg.epochs * steps_per_epoch, round(o.warmup_epochs * steps_per_epoch)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
                           for opt in self.optimizers]
        fp16 = self.dtype == torch.float16
        self.scalers = [torch.amp.GradScaler(device.type) if fp16 else None for _ in self.students]
        # the whole step as one CUDA graph where it applies (trainer/engine/graphed.py); None: eager steps
        self.graphed = GraphedStep(self._compute, self.optimizers, device) if graphs_wanted(
            cfg.cuda_graphs, device=device, dtype=self.dtype, world_size=world, compile_mode=cfg.compile) else None

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        return teacher_forward(self.teacher, images, self.dtype)

    def step(self, images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None = None,
             teacher_confidence: torch.Tensor | None = None) -> StepStats:
        """One optimisation step of every student; returns this step's StepStats (device, no sync).

        teacher_confidence: a precomputed 1 - H/log C at tau = 1 per sample (a teacher cache's `weight`).
        With CUDA graphs (`self.graphed`) the returned tensors are the graph's static outputs: read or copy
        them before the next step (the loop adds them into its sums at once)."""
        lc = self.cfg.loss
        if lc.beta != 0.0 and teacher_logits is None and self.teacher is None:
            raise ValueError("this mode needs teacher logits: an online teacher or a teacher cache")
        if lc.beta == 0.0:
            teacher_logits = None
        if teacher_logits is None or lc.entropy_tau != 1.0:
            teacher_confidence = None  # a cached confidence was computed at tau = 1
        run = self.graphed if self.graphed is not None else self._compute
        stats = run(images, labels, teacher_logits, teacher_confidence)
        for sched in self.schedulers:
            sched.step()
        return stats

    def _compute(self, images: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                 teacher_confidence: torch.Tensor | None) -> StepStats:
        """Everything of a step that runs on the device, without a host sync: what a CUDA graph captures
        (the online teacher, the student forwards, the losses, one backward, the optimizer steps)."""
        lc = self.cfg.loss
        if lc.beta != 0.0 and teacher_logits is None:
            teacher_logits = self.teacher_logits(images)
        weight, h1 = None, None
        if teacher_logits is not None:  # teacher statistics once per batch, shared by every student's loss
            h1 = entropy(teacher_logits, 1.0)
            weight = teacher_weight(teacher_logits, lc.weight_fn, lc.entropy_tau, confidence=teacher_confidence)
        # no autocast weight cache: each weight is cast once per step anyway, and a cache must not outlive a capture
        with autocast(self.device, self.dtype, cache=False):
            logits = [m(images) for m in self.forward]
        rows, total, keys = [], 0.0, term_keys()
        for i, z in enumerate(logits):
            peers = [p for j, p in enumerate(logits) if j != i] if lc.gamma != 0.0 else None
            t = distill_loss(z, peers, teacher_logits, labels, lc, weight=weight)
            scaler = self.scalers[i]
            total = total + (scaler.scale(t["loss"]) if scaler is not None else t["loss"])
            rows.append(torch.stack([t[k].detach() for k in keys]))
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        # The peer targets are detached and the teacher has no grad, so d(sum L_i)/d(theta_i) = dL_i/d(theta_i):
        # one backward serves all students (and lets DDP overlap their all-reduces).
        total.backward()
        for opt, scaler in zip(self.optimizers, self.scalers):
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        n = labels.new_full((), labels.shape[0], dtype=torch.float32)  # a fill kernel, not a host->device copy
        correct = torch.stack([(z.detach().argmax(dim=-1) == labels).sum() for z in logits]).float()
        ent = torch.stack([h1.sum(), entropy(teacher_logits, lc.tau).sum()]) if h1 is not None else n.new_zeros(2)
        return StepStats(torch.stack(rows) * n, correct, ent, n)

    def summarize(self, stats: StepStats) -> dict:
        """Per-sample means of summed stats (host side; syncs)."""
        terms, correct, ent = stats.terms.tolist(), stats.correct.tolist(), stats.entropy.tolist()
        count = stats.count.item()
        n = max(count, 1.0)
        teacher = self.cfg.uses_teacher
        students = [{"name": name, **{t: terms[i][j] / n for j, t in enumerate(term_keys())},
                     "train_acc": 100.0 * correct[i] / n} for i, name in enumerate(self.names)]
        if not teacher:  # no teacher term: there is no weight to report
            for s in students:
                s["w"] = None
        return {"images": int(count), "students": students, "w_mean": students[0]["w"],
                "teacher_entropy_tau1": ent[0] / n if teacher else None,
                "teacher_entropy_tau": ent[1] / n if teacher else None}

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics everywhere: DDP broadcasts buffers before each forward, so after
        the last step each rank holds its own; evaluation and checkpoints must see one model."""
        broadcast_from_rank0_(*(b for m in self.students for b in m.buffers()))

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
        if self.graphed is not None:  # the optimizers' state tensors were replaced: capture again
            self.graphed.reset()


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """SGD parameter groups: weight decay on every parameter (plain SGD, the paper's), or only on weights of
    two or more dimensions (BatchNorm scales and every bias excluded, a common ImageNet refinement)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
