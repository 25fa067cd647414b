"""JPEG decode on the GPU's hardware JPEG engines, through nvImageCodec (`decode_device="cuda-hw"`).

Why: torchvision's `decode_jpeg(device="cuda")` (nvJPEG on the GPU's CUDA cores) shares the streaming
multiprocessors with the training step: on an H200 the step's 15.6 ms plus 10.7 ms of decode a batch of 64
predicted the 2,478 img/s measured, 0.62 of the step alone (docs/loader.md "On a GPU machine"). A100, H100 and
H200 carry hardware JPEG decoders beside the SMs; nvImageCodec (the `dali` extra installs it; the CPU path
already uses its libjpeg-turbo ROI decode) drives them.

Each image's decoder is a function of its bytes alone, never of its batch: the hardware backend first (baseline
JPEGs), nvImageCodec's CUDA decoder for what it refuses (progressive JPEGs, other subsamplings), so a sample's
pixels do not depend on which batch it came in. Images neither decodes come back as None: the caller names the
sample (or skips it). Pixels differ from the CPU decoder's by the IDCT's rounding (~1-2 grey levels, like
nvJPEG's): a teacher cache records `decode_device`, and `auto` follows it.

Measured nowhere yet: no GPU has run this path (the gpu-marked tests and `tools/gpu_check.py` rows wait for one).
What to look at first when one does: nvImageCodec allocates each decoded image itself; if the profile shows
allocations or frees synchronising with the step, reuse a batch's Images (`decode(..., images=...)`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.core.errors import ConfigError

# backend names -> nvImageCodec backend kinds, tried in this order per image
BACKENDS = {"hw": "HW_GPU_ONLY", "cuda": "GPU_ONLY", "cpu": "CPU_ONLY"}


def nvimgcodec_module():
    """nvidia.nvimgcodec, or a ConfigError saying how to install it (the option is the user's)."""
    try:
        from nvidia import nvimgcodec
    except ImportError as e:
        raise ConfigError("decode_device 'cuda-hw' needs nvImageCodec: pip install nvidia-nvimgcodec-cu13 (the "
                          "`dali` extra installs it), or use decode_device 'cuda' or 'cpu'") from e
    return nvimgcodec


class HardwareJpegDecoder:
    """Batched JPEG -> uint8 (3, H, W) tensors on `device`, one nvImageCodec decoder per backend in `backends`
    (the first that decodes an image keeps it). `backends=("cpu",)` runs the same code on the CPU (tests)."""

    def __init__(self, device: torch.device, backends: Sequence[str] = ("hw", "cuda")):
        nv = nvimgcodec_module()
        self.nv, self.device = nv, torch.device(device)
        on_cpu = self.device.type == "cpu"
        device_id = nv.NVIMGCODEC_DEVICE_CPU_ONLY if on_cpu else (
            self.device.index if self.device.index is not None else torch.cuda.current_device())
        # load_hint 1.0, FIXED: every image goes to this backend first; no load balancing by batch position
        self.decoders = [nv.Decoder(device_id=device_id, max_num_cpu_threads=1 if on_cpu else 0,
                                    backends=[nv.Backend(getattr(nv, BACKENDS[b]), load_hint=1.0,
                                                         load_hint_policy=nv.FIXED)])
                         for b in backends]
        # like torchvision's decode_jpeg: no EXIF rotation (the index's h, w are the stored ones), RGB, 8 bits
        self.params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.SRGB, allow_any_depth=False,
                                      sample_format=nv.I_RGB)

    def __call__(self, datas: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Decoded images in the order of `datas` (None where no backend could decode one). On CUDA the
        decode is ordered on the current stream (the loader's prefetch stream)."""
        out: list[torch.Tensor | None] = [None] * len(datas)
        todo = list(range(len(datas)))
        stream = 0 if self.device.type == "cpu" else torch.cuda.current_stream(self.device).cuda_stream
        for dec in self.decoders:
            if not todo:
                break
            # a CodeStream only wraps the bytes; what cannot be parsed comes back None (with nvImageCodec's warning)
            images = dec.decode([self.nv.CodeStream(bytes(datas[i])) for i in todo], params=self.params,
                                cuda_stream=stream)
            for i, img in zip(todo, images):
                if img is not None:
                    out[i] = self._tensor(img)
            todo = [i for i in todo if out[i] is None]
        return out

    def _tensor(self, img) -> torch.Tensor:
        """An nvImageCodec image (H, W, 3) as a (3, H, W) uint8 view on this device."""
        if self.device.type == "cpu":
            return torch.from_numpy(np.array(img.cpu())).permute(2, 0, 1)
        return torch.from_dlpack(img).permute(2, 0, 1)  # zero-copy; DLPack orders it on the current stream
