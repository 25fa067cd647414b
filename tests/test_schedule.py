"""The learning-rate schedule against torch's own warm-up + cosine schedulers (an independent reference)."""
from __future__ import annotations

import pytest
import torch

from trainer.config import lr_factor


@pytest.mark.parametrize("total,warm", [(200, 20), (97, 13), (50, 2)])
def test_closed_form_schedule_matches_torchs_sequential_linear_then_cosine(total, warm):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / warm, 1.0, warm - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, total - warm, 0.0)], milestones=[warm])
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(step, total, warm), rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


def test_warm_up_starts_above_zero_and_the_decay_ends_at_zero():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == 1.0 and lr_factor(10, 100, 10) == 1.0
    assert lr_factor(100, 100, 10) == 0.0 and lr_factor(150, 100, 10) == 0.0
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)
