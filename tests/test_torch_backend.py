"""Torch backend pixels: colour definition, CPU vs torch-ops path, validation vs torchvision."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.io as tio
import torchvision.transforms.functional as TF
import torchvision.transforms.v2 as T2

from pipeline.core.augment import AugSpec, sample_params
from pipeline.reader.backends import cpu_views as cpu_views
from pipeline.reader.backends.cpu_views import colour_into, decode_region, train_view, val_view
from pipeline.reader.backends.torch_backend import aa_weights, augment_decoded, resize_batch
from pipeline.sources.synthetic import jpeg_bytes, synth_image

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
W = np.array([0.299, 0.587, 0.114])


def colour_reference(x: np.ndarray, b: float, c: float, s: float) -> np.ndarray:
    """docs/loader.md's colour definition, literally, in float64."""
    f = x.astype(np.float64)
    y1 = np.clip(b * f, 0, 255)
    m = (y1 @ W).mean()
    y2 = np.clip(c * y1 + (1 - c) * m, 0, 255)
    return np.clip(s * y2 + (1 - s) * (y2 @ W)[..., None], 0, 255)


def _decoded(rng, h, w) -> torch.Tensor:
    data = jpeg_bytes(synth_image(rng, h, w))
    return tio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tio.ImageReadMode.RGB)


@pytest.mark.parametrize("b,c,s", [(1.0, 1.0, 1.0), (1.4, 0.6, 1.3), (0.6, 1.4, 0.6), (1.2, 1.3, 1.4),
                                   (0.0, 0.8, 1.0), (1.4, 1.0, 0.0), (1.4, 1.4, 1.4)])
def test_colour_matches_definition(b, c, s):
    x = synth_image(np.random.default_rng(3), 48, 40)
    ours = colour_into(np.ascontiguousarray(x), b, c, s, np.empty_like(x)).astype(np.float64)
    ref = colour_reference(x, b, c, s)
    diff = np.abs(ours - ref)
    assert diff.max() <= 0.51 and diff.mean() < 0.26  # float32 all the way: the final rounding (+ float32 error)


def test_colour_is_torchvision_colorjitter_in_fixed_order():
    """On float images the definition is torchvision's brightness -> contrast -> saturation."""
    x = synth_image(np.random.default_rng(4), 32, 32)
    t = torch.from_numpy(x).permute(2, 0, 1).float() / 255
    tv = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(t, 1.3), 0.7), 1.2) * 255
    ref = colour_reference(x, 1.3, 0.7, 1.2)
    assert np.abs(tv.permute(1, 2, 0).numpy() - ref).max() < 0.35  # torchvision's 0.2989 vs 0.299 only


def test_cpu_path_close_to_torch_ops_path():
    """The CPU path (uint8 resize, PIL colour) and the GPU path's torch ops agree closely."""
    rng = np.random.default_rng(0)
    imgs = [_decoded(rng, 60 + 7 * k, 90 - 5 * k) for k in range(6)]
    spec = AugSpec(image_size=32, val_resize=36)
    p = sample_params(spec, 0, 0, np.arange(6), [im.shape[1] for im in imgs], [im.shape[2] for im in imgs])
    cpu = np.stack([train_view(im, p, i, 32) for i, im in enumerate(imgs)]).astype(float)
    ops = augment_decoded(imgs, p, spec)
    assert ops.dtype == torch.uint8 and ops.is_contiguous(memory_format=torch.channels_last)
    d = np.abs(cpu - ops.permute(0, 2, 3, 1).numpy())
    assert d.mean() < 1.0, d.mean()
    val_cpu = np.stack([val_view(im, spec).numpy() for im in imgs]).astype(float)
    val_ops = augment_decoded(imgs, None, spec).permute(0, 2, 3, 1).numpy()
    assert np.abs(val_cpu - val_ops).mean() < 1.0


def test_flip_and_crop_geometry():
    """A flipped view is the mirror of the unflipped one: flip happens after an identical crop."""
    rng = np.random.default_rng(1)
    img = _decoded(rng, 50, 70)
    p = sample_params(AugSpec(image_size=24, val_resize=24), 0, 0, np.arange(2), [50, 50], [70, 70])
    from dataclasses import replace
    p = replace(p, top=p.top[[0, 0]], left=p.left[[0, 0]], height=p.height[[0, 0]], width=p.width[[0, 0]],
                brightness=np.ones(2, np.float32), contrast=np.ones(2, np.float32),
                saturation=np.ones(2, np.float32), flip=np.array([False, True]))
    a, b = train_view(img, p, 0, 24), train_view(img, p, 1, 24)
    np.testing.assert_array_equal(a[:, ::-1], b)
    t, l, h, w = (int(v[0]) for v in (p.top, p.left, p.height, p.width))
    ref = TF.resize(img[:, t:t + h, l:l + w], [24, 24], antialias=True).permute(1, 2, 0).numpy()
    assert np.abs(a.astype(int) - ref).max() <= 1  # crop + antialiased resize (uint8 fast path: +-1)


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (256, 300), (240, 240)])
def test_validation_matches_torchvision(shape):
    """Shorter side -> 256, centre 224, against torchvision on the same decoded tensor and on PIL."""
    rng = np.random.default_rng(shape[0])
    img = _decoded(rng, *shape)
    ours = val_view(img, AugSpec()).numpy().astype(float)
    tv = T2.Compose([T2.Resize(256, antialias=True), T2.CenterCrop(224)])(img).permute(1, 2, 0).numpy()
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - tv).mean() < 1.0
    from PIL import Image
    pil = np.asarray(T2.Compose([T2.Resize(256), T2.CenterCrop(224)])(Image.fromarray(img.permute(1, 2, 0).numpy())))
    assert np.abs(ours - pil).mean() < 1.0


@pytest.mark.parametrize("budget", [256 << 20, 1])  # one padded group; or each image alone
def test_batched_resize_equals_interpolate_per_image(monkeypatch, budget):
    """The GPU path's two mat-muls reproduce interpolate(antialias=True) image by image, for shrinking,
    enlarging and a validation-style window of a larger resize."""
    import pipeline.reader.backends.torch_backend as tb

    monkeypatch.setattr(tb, "PAD_BUDGET", budget)
    rng = np.random.default_rng(5)
    crops = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in [(50, 70), (20, 9), (33, 33)]]
    rows = tuple(torch.tensor(v) for v in ([50, 20, 33], [24, 24, 24], [0, 0, 0]))
    cols = tuple(torch.tensor(v) for v in ([70, 9, 33], [24, 24, 24], [0, 0, 0]))
    ours = resize_batch(crops, rows, cols, 24)
    for k, c in enumerate(crops):
        ref = torch.nn.functional.interpolate(c[None].float(), size=(24, 24), mode="bilinear", antialias=True)
        assert (ours[k] - ref[0]).abs().max() < 1e-3
    w = aa_weights(torch.tensor([100]), torch.tensor([60]), torch.tensor([10]), 24, 128)
    full = torch.nn.functional.interpolate(torch.eye(100)[None, None], size=(60, 100), mode="bilinear",
                                           antialias=True)[0, 0, 10:34]  # rows 10..33 of a 100 -> 60 resize
    assert w.shape == (1, 24, 128) and (w[0, :, 100:] == 0).all()
    assert (w[0, :, :100] - full).abs().max() < 1e-5


def test_roi_decode_gives_the_pixels_of_the_full_decode(monkeypatch):
    """Decoding only the crop box (nvImageCodec, when installed) changes no pixel; without it the crop
    is a view of torchvision's full decode. A size other than the index's is refused either way."""
    data = jpeg_bytes(synth_image(np.random.default_rng(2), 75, 101))
    full = cpu_views.decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    box = (9, 17, 40, 61)
    roi = decode_region(data, (75, 101), box)
    assert roi.shape == (3, 40, 61) and roi.stride()[0] == 1  # HWC memory
    assert torch.equal(roi, full[:, 9:49, 17:78])
    with pytest.raises(ValueError, match="decoded 75x101 but the index says 75x100"):
        decode_region(data, (75, 100), box)
    with pytest.raises((ValueError, RuntimeError)):  # what the decoder says is not a JPEG
        decode_region(b"\xff\xd8 not a jpeg", (75, 101), box)
    monkeypatch.setitem(cpu_views._ROI, "decoder", None)  # as without nvImageCodec
    monkeypatch.setitem(cpu_views._ROI, "pid", __import__("os").getpid())
    assert torch.equal(decode_region(data, (75, 101), box), roi)
    with pytest.raises(ValueError, match="index says 74x101"):
        decode_region(data, (74, 101), box)


def test_roi_decoder_is_used_when_installed():
    pytest.importorskip("nvidia.nvimgcodec")
    assert cpu_views.roi_decoder() is not None
