"""The batch contract every backend and the loader deliver, and the trainer consumes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# ImageNet normalisation, in 0..255 units so uint8 images normalise with one fused op.
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class Batch:
    """One batch: images NCHW in channels_last memory (uint8, or normalised float), labels and
    sample ids (int64), the training epoch, and, with a teacher cache, the teacher's logits and
    confidence weight for exactly these (epoch, ids)."""

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    epoch: int
    teacher_logits: torch.Tensor | None = None
    teacher_weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        """The same batch on another device (images keep channels_last)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.images), move(self.labels), move(self.ids), self.epoch,
                     move(self.teacher_logits), move(self.teacher_weight))


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To a GPU it goes through pinned memory without blocking: a copy from
    pageable memory synchronises the stream, which would drain the training queue once per batch."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def normalize_images(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW -> (x - mean) / std in dtype, channels_last kept. Computed in float32, then cast."""
    mean = torch.tensor(IMAGENET_MEAN_255, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255, device=images.device).view(1, 3, 1, 1)
    out = (images.float() - mean) / std
    return out.to(dtype).contiguous(memory_format=torch.channels_last)
