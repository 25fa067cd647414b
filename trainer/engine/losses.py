"""Distillation losses: pure functions of logits, computed in float32 even under autocast.

Conventions (../shared/DESIGN.md): KL is summed over classes and averaged over the batch
("batchmean"), scaled by tau^2 so gradients keep their size as tau changes (Hinton et al. 2015).
"forward" is the standard direction KL(target || student) with the teacher (or peer) as the target;
"reverse" is KL(student || target), the paper's literal notation.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import torch
import torch.nn.functional as F

from pipeline.core.entropy import confidence_weight

from trainer.config import Direction, WeightFn  # the choices live with the config (torch-free for the CLI)

DIRECTIONS: tuple[str, ...] = get_args(Direction)
WEIGHT_FNS: tuple[str, ...] = get_args(WeightFn)
TERMS = ("loss", "hard", "teacher", "peer", "w")  # the keys of dual_student_loss, in logging order


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


def dual_student_loss(student_logits: torch.Tensor,
                      peer_logits: torch.Tensor | Sequence[torch.Tensor] | None,
                      teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
                      alpha: float, beta: float, gamma: float, tau: float,
                      weight_fn: str = "confidence", direction: str = "forward",
                      entropy_tau: float = 1.0,
                      weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """L = alpha * CE + beta * mean(w * tau^2 KL(teacher)) + gamma * tau^2 KL(peer), as a dict.

    `peer_logits` may be one tensor or a list (three or more students: the peer term is the
    mean over peers) or None (single student). `teacher_logits=None` means no teacher term
    (hard-label training). The teacher term's per-sample weight follows `weight_fn` (see
    `teacher_weight`); `weight` is a precomputed one (e.g. from a teacher cache) used as given.
    Every value is a float32 scalar; "w" is the batch mean of the weight used.
    """
    hard = F.cross_entropy(student_logits.float(), labels)
    zero = hard.new_zeros(())
    teacher, w_mean = zero, zero
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match "
                             f"student logits {tuple(student_logits.shape)} (different number of classes?)")
        if weight_fn == "none":
            w = None
        else:
            w = weight if weight is not None else teacher_weight(teacher_logits, weight_fn, entropy_tau)
        if w is not None:
            w = w.detach().float()
            teacher, w_mean = kd_loss(student_logits, teacher_logits, tau, w, direction), w.mean()
        else:
            teacher, w_mean = kd_loss(student_logits, teacher_logits, tau, None, direction), hard.new_ones(())
    peers = [] if peer_logits is None else [peer_logits] if torch.is_tensor(peer_logits) else list(peer_logits)
    peer = zero
    if peers:
        peer = torch.stack([peer_loss(student_logits, p, tau, direction) for p in peers]).mean()
    loss = alpha * hard + beta * teacher + gamma * peer
    return {"loss": loss, "hard": hard.detach(), "teacher": teacher.detach(), "peer": peer.detach(),
            "w": w_mean.detach()}
