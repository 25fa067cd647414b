"""Distillation losses: pure functions of logits, computed in float32 even under autocast, and the registry of
loss terms that `distill_loss` sums (a new term: its function and one `register_term` line; its per-student
value is logged under its name in metrics.jsonl with no other edit).

Conventions (../shared/DESIGN.md): KL is summed over classes and averaged over the batch
("batchmean"), scaled by tau^2 so gradients keep their size as tau changes (Hinton et al. 2015).
"forward" is the standard direction KL(target || student) with the teacher (or peer) as the target;
"reverse" is KL(student || target), the paper's literal notation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from pipeline.core.entropy import confidence_weight

from trainer.config import Direction, LossConfig, WeightFn  # the choices live with the config (torch-free)

DIRECTIONS: tuple[str, ...] = get_args(Direction)
WEIGHT_FNS: tuple[str, ...] = get_args(WeightFn)


def entropy(logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-sample entropy (nats) of softmax(logits / tau), in float32, without gradient: the torch twin of
    pipeline.core.entropy.entropy (numpy, float64), tested equal."""
    logp = F.log_softmax(logits.detach().float() / tau, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def entropy_weight(teacher_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Teacher confidence per sample: w = 1 - H(softmax(z_T / tau)) / log C, in [0, 1].

    A confident (peaked) teacher gives w near 1; a uniform one gives 0, so its advice counts less.
    """
    return confidence_weight(entropy(teacher_logits, tau), teacher_logits.shape[-1])


def teacher_weight(teacher_logits: torch.Tensor, weight_fn: str, tau: float = 1.0,
                   confidence: torch.Tensor | None = None) -> torch.Tensor | None:
    """The per-sample weight of the teacher term under `weight_fn` (None for "none": w = 1).

    `confidence`, when given, is a precomputed 1 - H/log C at tau (e.g. from a teacher cache), so the
    entropy is not computed again."""
    if weight_fn not in WEIGHT_FNS:
        raise ValueError(f"weight_fn must be one of {WEIGHT_FNS}, got {weight_fn!r}")
    if weight_fn == "none":
        return None
    conf = confidence if confidence is not None else entropy_weight(teacher_logits, tau)
    return conf if weight_fn == "confidence" else 1.0 - conf


def _kl_per_sample(student_logits: torch.Tensor, target_logits: torch.Tensor, tau: float,
                   direction: str) -> torch.Tensor:
    """tau^2 * KL per sample (sum over classes); the target carries no gradient."""
    if direction not in DIRECTIONS:
        raise ValueError(f"KL direction must be one of {DIRECTIONS}, got {direction!r}")
    log_q = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p = F.log_softmax(target_logits.detach().float() / tau, dim=-1)
    if direction == "forward":  # KL(p_target || q_student)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    else:  # KL(q_student || p_target)
        kl = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return kl * (tau * tau)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float,
            weight: torch.Tensor | None = None, direction: str = "forward") -> torch.Tensor:
    """Scalar: mean over the batch of weight * tau^2 * KL(p_T^tau || q_S^tau) (or reverse)."""
    per_sample = _kl_per_sample(student_logits, teacher_logits, tau, direction)
    if weight is not None:
        per_sample = per_sample * weight.detach().float()
    return per_sample.mean()


def peer_loss(student_logits: torch.Tensor, peer_logits: torch.Tensor, tau: float,
              direction: str = "forward") -> torch.Tensor:
    """Scalar: mean over the batch of tau^2 * KL(q_peer^tau || q_S^tau); the peer is detached,
    so the term only moves the student it belongs to."""
    return _kl_per_sample(student_logits, peer_logits.detach(), tau, direction).mean()


@dataclass(frozen=True)
class TermInputs:
    """What a loss term sees for one student and batch."""

    student: torch.Tensor  # this student's logits
    peers: list[torch.Tensor]  # the other students' logits (empty: no peer term this step)
    teacher: torch.Tensor | None  # teacher logits (None: no teacher term this step)
    labels: torch.Tensor
    weight: torch.Tensor | None  # the teacher term's per-sample weight, float32, detached (None: w = 1)
    cfg: LossConfig


@dataclass(frozen=True)
class LossTerm:
    """A registered term: L = sum over terms of weight(cfg) * fn(inputs); `fn` returns a float32 scalar, or None
    where the term does not apply to the batch (it then counts as 0). `weight` is a LossConfig field's name or
    a function of the LossConfig."""

    name: str
    fn: Callable[[TermInputs], torch.Tensor | None]
    weight: str | Callable[[LossConfig], float]

    def weight_of(self, cfg: LossConfig) -> float:
        return getattr(cfg, self.weight) if isinstance(self.weight, str) else self.weight(cfg)


_TERMS: dict[str, LossTerm] = {}


def register_term(term: LossTerm) -> LossTerm:
    """Add a loss term (logged per student in metrics.jsonl under its name); a taken name is an error."""
    if term.name in _TERMS or term.name in ("loss", "w", "name", "train_acc", "val_top1", "val_top5"):
        raise ValueError(f"loss term name {term.name!r} is taken")
    _TERMS[term.name] = term
    return term


def unregister_term(name: str) -> None:
    """Remove a term added with `register_term` (tests add toy terms and take them away again)."""
    _TERMS.pop(name)


def term_keys() -> tuple[str, ...]:
    """The keys of `distill_loss`'s dict, in logging order: "loss", each registered term, "w"."""
    return ("loss", *_TERMS, "w")


def _hard(x: TermInputs) -> torch.Tensor:
    return F.cross_entropy(x.student.float(), x.labels)


def _teacher(x: TermInputs) -> torch.Tensor | None:
    if x.teacher is None:
        return None
    return kd_loss(x.student, x.teacher, x.cfg.tau, x.weight, x.cfg.direction)


def _peer(x: TermInputs) -> torch.Tensor | None:
    if not x.peers:
        return None
    return torch.stack([peer_loss(x.student, p, x.cfg.tau, x.cfg.direction) for p in x.peers]).mean()


# The paper's three terms: a new term is its function plus one line here (and its weight field in LossConfig).
register_term(LossTerm("hard", _hard, "alpha"))  # cross-entropy with the labels
register_term(LossTerm("teacher", _teacher, "beta"))  # w * tau^2 * KL to the teacher
register_term(LossTerm("peer", _peer, "gamma"))  # tau^2 * KL to the other students (detached), mean over peers


def distill_loss(student_logits: torch.Tensor,
                 peer_logits: torch.Tensor | Sequence[torch.Tensor] | None,
                 teacher_logits: torch.Tensor | None, labels: torch.Tensor, cfg: LossConfig, *,
                 weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """L = sum of the registered terms, each times its weight (alpha * CE + beta * mean(w * tau^2 KL(teacher))
    + gamma * tau^2 KL(peer) with the built-in ones), as a dict keyed by `term_keys()`.

    `peer_logits` may be one tensor or a list (three or more students: the peer term is the mean over peers)
    or None (single student). `teacher_logits=None` means no teacher term (hard-label training). The teacher
    term's per-sample weight follows `cfg.weight_fn` (see `teacher_weight`); `weight` is a precomputed one
    (e.g. from a teacher cache) used as given. Every value is a float32 scalar; "w" is the batch mean of the
    weight used."""
    zero = student_logits.new_zeros((), dtype=torch.float32)
    w, w_mean = None, zero
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match "
                             f"student logits {tuple(student_logits.shape)} (different number of classes?)")
        if cfg.weight_fn != "none":
            w = weight if weight is not None else teacher_weight(teacher_logits, cfg.weight_fn, cfg.entropy_tau)
        if w is not None:
            w = w.detach().float()
        w_mean = w.mean() if w is not None else zero.new_ones(())
    peers = [] if peer_logits is None else [peer_logits] if torch.is_tensor(peer_logits) else list(peer_logits)
    inputs = TermInputs(student_logits, peers, teacher_logits, labels, w, cfg)
    values, loss = {}, None
    for term in _TERMS.values():
        value = term.fn(inputs)
        values[term.name] = zero if value is None else value
        part = term.weight_of(cfg) * values[term.name]
        loss = part if loss is None else loss + part
    return {"loss": zero if loss is None else loss, **{k: v.detach() for k, v in values.items()},
            "w": w_mean.detach()}


def dual_student_loss(student_logits: torch.Tensor,
                      peer_logits: torch.Tensor | Sequence[torch.Tensor] | None,
                      teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
                      alpha: float, beta: float, gamma: float, tau: float,
                      weight_fn: str = "confidence", direction: str = "forward",
                      entropy_tau: float = 1.0,
                      weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`distill_loss` with the LossConfig given as keyword arguments (the paper's three terms' weights)."""
    cfg = LossConfig(alpha=alpha, beta=beta, gamma=gamma, tau=tau, weight_fn=weight_fn, direction=direction,
                     entropy_tau=entropy_tau)
    return distill_loss(student_logits, peer_logits, teacher_logits, labels, cfg, weight=weight)
