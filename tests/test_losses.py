"""Losses against hand-computed values: both KL directions, batchmean, tau^2, w, detached peer."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.engine.losses import dual_student_loss, entropy, entropy_weight, kd_loss, peer_loss

LN3 = math.log(3.0)
# p_T = softmax([ln 3, 0]) = [0.75, 0.25]; q_S = softmax([0, 0]) = [0.5, 0.5]
KL_FWD = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p || q) = 0.130812
KL_REV = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(q || p) = 0.143841
H_T = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # 0.562335 nats
W_T = 1 - H_T / math.log(2)  # 0.188722


def test_hand_values_are_what_we_think():
    assert KL_FWD == pytest.approx(0.130812, abs=1e-6)
    assert KL_REV == pytest.approx(0.143841, abs=1e-6)
    assert W_T == pytest.approx(0.188722, abs=1e-6)


def test_kd_loss_forward_reverse_tau_squared_and_batchmean():
    tau = 2.0
    teacher = torch.tensor([[2 * LN3, 0.0], [0.0, 0.0]])  # /tau -> [ln3, 0] and uniform
    student = torch.zeros(2, 2)
    # sample 2 has KL 0, so batchmean halves sample 1's value; tau^2 = 4
    assert kd_loss(student, teacher, tau).item() == pytest.approx(4 * KL_FWD / 2, rel=1e-5)
    assert kd_loss(student, teacher, tau, direction="reverse").item() == pytest.approx(4 * KL_REV / 2, rel=1e-5)
    # agrees with PyTorch's own batchmean KL (forward direction)
    ref = F.kl_div(F.log_softmax(student / tau, -1), F.softmax(teacher / tau, -1), reduction="batchmean") * tau**2
    assert kd_loss(student, teacher, tau).item() == pytest.approx(ref.item(), rel=1e-6)


def test_kd_loss_weight_is_per_sample():
    teacher = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
    student = torch.zeros(2, 2)
    w = torch.tensor([1.0, 0.0])
    assert kd_loss(student, teacher, 1.0, weight=w).item() == pytest.approx(KL_FWD / 2, rel=1e-5)


def test_bad_direction_is_an_error():
    with pytest.raises(ValueError, match="direction"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), 1.0, direction="sideways")


def test_entropy_weight_values():
    logits = torch.tensor([[LN3, 0.0], [0.0, 0.0], [100.0, 0.0]])
    w = entropy_weight(logits)
    assert w.tolist() == pytest.approx([W_T, 0.0, 1.0], abs=1e-5)
    assert entropy(logits[:1]).item() == pytest.approx(H_T, rel=1e-5)
    # at tau = 2 the teacher looks less sure: [ln3/2, 0] -> p = [sqrt3/(1+sqrt3), ...]
    p = math.sqrt(3) / (1 + math.sqrt(3))
    h2 = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert entropy_weight(logits[:1], tau=2.0).item() == pytest.approx(1 - h2 / math.log(2), rel=1e-5)


def test_float32_inside_under_low_precision_inputs():
    s = torch.randn(4, 10).bfloat16().requires_grad_()
    t = torch.randn(4, 10).bfloat16()
    out = kd_loss(s, t, 4.0)
    assert out.dtype == torch.float32
    out.backward()
    assert s.grad is not None and s.grad.dtype == torch.bfloat16


def test_peer_gets_no_gradient_and_teacher_neither():
    s = torch.randn(3, 5, requires_grad=True)
    peer = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    terms = dual_student_loss(s, peer, teacher, labels, alpha=0.4, beta=0.4, gamma=0.2, tau=4.0)
    terms["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert peer.grad is None and teacher.grad is None
    assert peer_loss(s, peer, 4.0).requires_grad


def test_dual_student_loss_combines_terms_by_hand():
    student = torch.zeros(2, 2)
    teacher = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
    peer = torch.tensor([[0.0, LN3], [0.0, LN3]])  # p_peer = [0.25, 0.75]: same KL by symmetry
    labels = torch.tensor([0, 1])
    t = dual_student_loss(student, peer, teacher, labels, alpha=0.4, beta=0.4, gamma=0.2, tau=1.0)
    assert t["hard"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert t["w"].item() == pytest.approx(W_T, rel=1e-5)
    assert t["teacher"].item() == pytest.approx(W_T * KL_FWD, rel=1e-5)
    assert t["peer"].item() == pytest.approx(KL_FWD, rel=1e-5)
    expected = 0.4 * math.log(2) + 0.4 * W_T * KL_FWD + 0.2 * KL_FWD
    assert t["loss"].item() == pytest.approx(expected, rel=1e-5)
    # weight_fn "none": w = 1 (even if a weight is passed); a given weight overrides the entropy
    t1 = dual_student_loss(student, None, teacher, labels, alpha=0.3, beta=0.7, gamma=0.0, tau=1.0,
                           weight_fn="none", weight=torch.tensor([0.5, 0.5]))
    assert t1["teacher"].item() == pytest.approx(KL_FWD, rel=1e-5) and t1["w"].item() == 1.0
    # weight_fn "entropy": the opposite weight, H / log C = 1 - W_T
    t3 = dual_student_loss(student, None, teacher, labels, alpha=0.3, beta=0.7, gamma=0.0, tau=1.0,
                           weight_fn="entropy")
    assert t3["w"].item() == pytest.approx(1.0 - W_T, rel=1e-5)
    assert t3["teacher"].item() == pytest.approx((1.0 - W_T) * KL_FWD, rel=1e-5)
    t2 = dual_student_loss(student, None, teacher, labels, alpha=0.3, beta=0.7, gamma=0.0, tau=1.0,
                           weight=torch.tensor([0.5, 0.5]))
    assert t2["teacher"].item() == pytest.approx(0.5 * KL_FWD, rel=1e-5)


def test_peer_term_averages_over_several_peers():
    student = torch.zeros(1, 2)
    peers = [torch.tensor([[LN3, 0.0]]), torch.zeros(1, 2)]  # KLs: KL_FWD and 0
    t = dual_student_loss(student, peers, None, torch.tensor([0]), alpha=0.0, beta=0.0, gamma=1.0, tau=1.0)
    assert t["peer"].item() == pytest.approx(KL_FWD / 2, rel=1e-5)
    assert t["teacher"].item() == 0.0


def test_class_count_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="number of classes"):
        dual_student_loss(torch.zeros(2, 5), None, torch.zeros(2, 7), torch.tensor([0, 1]),
                          alpha=0.3, beta=0.7, gamma=0.0, tau=4.0)
