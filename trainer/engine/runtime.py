"""What every job needs from the machine, written once: device choice and precision (re-exported from
pipeline.core.device, their one home), autocast, torchrun set-up and collectives, the frozen teacher (loading and
forward), file hashing and core counts. Used by train, cache-teacher and eval.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.core.errors import CheckpointError, ConfigError, KdpipeError
from pipeline.core.device import PRECISIONS, precision_dtype, precision_name, resolve_device
from pipeline.core.digest import file_sha256
from pipeline.core.procs import usable_cores

__all__ = ["PRECISIONS", "resolve_device", "precision_dtype", "precision_name", "autocast", "distributed",
           "dist_info", "all_reduce_sum_", "all_gather_list", "init_distributed", "barrier", "load_teacher",
           "teacher_forward", "file_sha256", "usable_cores"]

def autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """autocast on the device for a low-precision dtype; a no-op context for fp32 or None. cache=False: no
    cache of cast weights (required inside a CUDA graph capture)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


# ---------------------------------------------------------------- torchrun

def distributed() -> bool:
    """True inside a joined process group (torchrun), where the collectives below talk to the other ranks."""
    return dist.is_available() and dist.is_initialized()


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of the joined process group; (0, 1) without one."""
    if distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over the ranks, in place (every rank gets the totals); nothing without a process group."""
    if distributed():
        for t in tensors:
            dist.all_reduce(t)


def broadcast_from_rank0_(*tensors: torch.Tensor) -> None:
    """Rank 0's values of each tensor on every rank, in place; nothing without a process group."""
    if distributed():
        for t in tensors:
            dist.broadcast(t, 0)


def all_gather_list(local: list) -> list:
    """Every rank's list of picklable items, concatenated in rank order (on every rank); `local` itself without a
    process group."""
    if not distributed() or dist.get_world_size() == 1:
        return local
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [x for p in parts for x in p]


def init_distributed(device: str | torch.device) -> tuple[torch.device, bool]:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL with GPU LOCAL_RANK when the device is CUDA,
    else gloo on the CPU. Returns the device this rank uses and whether this call created the group (the
    caller destroys it)."""
    device = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return device, True


def barrier() -> None:
    if distributed():
        dist.barrier()


# ---------------------------------------------------------------- the teacher

def load_teacher(name: str, weights: str | Path, classes: list[str], device: torch.device,
                 channels_last: bool = True) -> nn.Module:
    """The frozen teacher: `name` with len(classes) outputs, weights from a local file (see
    trainer.engine.models.load_weights), eval mode, no grad, on `device`."""
    from trainer.engine.models import build_model, load_weights

    try:
        model = build_model(name, len(classes))
    except ValueError as e:
        raise ConfigError(f"--teacher {name}: {e}") from e
    try:
        model = load_weights(model, weights, name=name, classes=classes)
    except KdpipeError:
        raise
    except ValueError as e:  # the weights do not fit this teacher or these classes: the file's fault
        raise CheckpointError(f"--teacher-weights {weights}: {e}") from e
    model.eval().requires_grad_(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device, memory_format=fmt)


@torch.no_grad()
def teacher_forward(model: nn.Module, images: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """float32 logits of a normalised NCHW batch already on the model's device, under autocast in `dtype`."""
    with autocast(images.device, dtype):
        return model(images).float()
