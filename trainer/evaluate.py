"""Top-1 / top-5 accuracy of each student and of their ensemble (mean of the softmaxes).

Counts stay on the device during the pass and are summed across DDP ranks at the end, so a run
on several GPUs reports the accuracy over the whole validation split.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """How many samples have their label among the top-k logits, for each k (k capped at C)."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices
    hit = top == labels[:, None]
    return torch.stack([hit[:, :min(k, kmax)].any(dim=-1).sum() for k in ks])


def autocast_for(device: torch.device, dtype: torch.dtype | None):
    """autocast on the device when a low-precision dtype is given, else a no-op context."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(models: Sequence[nn.Module], batches: Iterable, device: torch.device, *,
             amp_dtype: torch.dtype | None = None, channels_last: bool = True) -> dict:
    """{"top1": [per model], "top5": [...], "ensemble_top1", "ensemble_top5", "count"} in percent.

    `batches` yields pipeline Batch objects (images normalised). Models are put in eval mode and
    restored to their previous mode afterwards.
    """
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    counts = torch.zeros(len(models) + 1, 2, device=device, dtype=torch.float64)
    seen = torch.zeros((), device=device, dtype=torch.float64)
    try:
        for batch in batches:
            batch = batch.to(device)
            images = batch.images
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, amp_dtype):
                logits = [m(images).float() for m in models]
            probs = torch.stack([z.softmax(dim=-1) for z in logits]).mean(dim=0)
            for i, z in enumerate(logits + [probs]):
                counts[i] += topk_correct(z, batch.labels)
            seen += batch.labels.shape[0]
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
        dist.all_reduce(seen)
    n = max(seen.item(), 1.0)
    acc = (counts * 100.0 / n).tolist()
    return {"top1": [a[0] for a in acc[:-1]], "top5": [a[1] for a in acc[:-1]],
            "ensemble_top1": acc[-1][0], "ensemble_top5": acc[-1][1], "count": int(seen.item())}


def format_table(names: Sequence[str], result: dict) -> str:
    """A small fixed-width table: one row per student, then the ensemble."""
    rows = [f"{'model':<20} {'top-1 %':>8} {'top-5 %':>8}"]
    for name, t1, t5 in zip(names, result["top1"], result["top5"]):
        rows.append(f"{name:<20} {t1:>8.2f} {t5:>8.2f}")
    if len(names) > 1:
        rows.append(f"{'ensemble (mean p)':<20} {result['ensemble_top1']:>8.2f} {result['ensemble_top5']:>8.2f}")
    rows.append(f"({result['count']} validation images)")
    return "\n".join(rows)
