"""Augmentation params: torchvision's RandomResizedCrop rule exactly, counter-based purity, epoch order."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.transforms as tv_transforms

from pipeline.core.augment import AugSpec, crop_from_uniforms, epoch_order, sample_params, val_geometry

# (height, width): ordinary photos, squares, tiny images, and extreme shapes where every try can
# fail and the centre-crop fallback (clamped to the ratio range) decides.
SHAPES = [(375, 500), (500, 333), (224, 224), (7, 9), (1000, 40), (30, 900), (1, 1), (2, 300)]


class _FakeTorch:
    """Stands in for `torch` inside torchvision's get_params, serving our uniforms in its draw order."""

    def __init__(self, area_ratio: list[tuple[float, float]], top: float, left: float):
        self.draws = [u for pair in area_ratio for u in pair]
        self.ints = [top, left]
        self.log, self.exp = torch.log, torch.exp

    def tensor(self, x):
        return torch.tensor(x, dtype=torch.float64)

    def empty(self, n):
        fake = self

        class _U:
            def uniform_(self, a, b):
                u = fake.draws.pop(0)
                return torch.tensor([float(a) + (float(b) - float(a)) * u], dtype=torch.float64)

        return _U()

    def randint(self, lo, hi, size):
        return torch.tensor([lo + math.floor(self.ints.pop(0) * (hi - lo))])


@pytest.mark.parametrize("shape", SHAPES)
def test_crop_rule_matches_torchvision_exactly(shape, monkeypatch):
    """Same uniforms in -> same crop out as torchvision's own get_params code, fallback included."""
    h, w = shape
    rng = np.random.default_rng(h * 1000 + w)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    n = 300
    ua, ur = rng.random((n, 10)), rng.random((n, 10))
    if h * w < 50:  # tiny images: force some failing tries by using small areas
        ua[: n // 2] = 0.0
    ut, ul = rng.random(n), rng.random(n)
    top, left, hh, ww = crop_from_uniforms(np.full(n, h), np.full(n, w), lambda t, r: (ua[r, t], ur[r, t]),
                                           ut, ul, scale, ratio)
    img = torch.zeros(1, h, w)
    for k in range(n):
        monkeypatch.setattr(tv_transforms, "torch", _FakeTorch(list(zip(ua[k], ur[k])), ut[k], ul[k]))
        assert T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) == (top[k], left[k], hh[k], ww[k])


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.union1d(a, b)
    ca = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(ca - cb).max())


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (64, 64), (1000, 40), (30, 900)])
def test_crop_distribution_matches_torchvision(shape):
    """Our counter-based draws give the same distribution of crops as torchvision's own RNG."""
    h, w = shape
    n = 4000
    p = sample_params(AugSpec(), seed=1, epoch=0, ids=np.arange(n), heights=np.full(n, h), widths=np.full(n, w))
    torch.manual_seed(0)
    img = torch.zeros(1, h, w)
    ref = np.array([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    ours = np.stack([p.top, p.left, p.height, p.width], axis=1)
    for col, name in enumerate(["top", "left", "height", "width"]):
        assert _ks(ours[:, col], ref[:, col]) < 0.05, name  # critical value at n=4000, alpha~1e-3: ~0.044
    # fallback frequency (centre crop of the clamped whole image) agrees too
    fb = lambda a: np.mean((a[:, 0] == (h - a[:, 2]) // 2) & ((a[:, 2] == h) | (a[:, 3] == w)))  # noqa: E731
    assert abs(fb(ours) - fb(ref)) < 0.03
    assert ((ours[:, 0] + ours[:, 2]) <= h).all() and ((ours[:, 1] + ours[:, 3]) <= w).all()
    assert (ours[:, 2] >= 1).all() and (ours[:, 3] >= 1).all()


def test_fallback_on_extreme_shapes():
    """A 1000x40 strip cannot hold a 3/4..4/3 crop of area >= 8 %: all crops are the clamped centre."""
    n = 200
    p = sample_params(AugSpec(), 0, 0, np.arange(n), np.full(n, 1000), np.full(n, 40))
    assert (p.width == 40).all() and (p.height == round(40 / 0.75)).all()
    assert (p.top == (1000 - 53) // 2).all() and (p.left == 0).all()


def test_colour_and_flip_distributions():
    n = 20000
    p = sample_params(AugSpec(), 3, 1, np.arange(n), np.full(n, 300), np.full(n, 400))
    for f in (p.brightness, p.contrast, p.saturation):
        assert f.dtype == np.float32 and f.min() >= 0.6 and f.max() <= 1.4
        assert abs(f.mean() - 1.0) < 0.01 and abs(f.std() - 0.8 / math.sqrt(12)) < 0.01
    assert abs(p.flip.mean() - 0.5) < 0.02
    assert np.corrcoef(p.brightness, p.contrast)[0, 1] < 0.03  # independent draws
    q = sample_params(AugSpec(brightness=0, contrast=0, saturation=0, flip_p=0), 3, 1, np.arange(10),
                      np.full(10, 30), np.full(10, 40))
    assert (q.brightness == 1).all() and (q.contrast == 1).all() and not q.flip.any()


def test_rows_depend_only_on_seed_epoch_id_and_size():
    spec = AugSpec()
    ids = np.arange(1000)
    hs, ws = 100 + ids % 400, 120 + (ids * 7) % 390
    full = sample_params(spec, 5, 2, ids, hs, ws)
    perm = np.random.default_rng(0).permutation(1000)[:137]
    part = sample_params(spec, 5, 2, ids[perm], hs[perm], ws[perm])
    for k in full.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(full, k)[perm], getattr(part, k))
    other_epoch = sample_params(spec, 5, 3, ids, hs, ws)
    other_seed = sample_params(spec, 6, 2, ids, hs, ws)
    assert (other_epoch.top != full.top).mean() > 0.9 and (other_seed.left != full.left).mean() > 0.9
    assert (other_epoch.brightness != full.brightness).all()


def test_spec_validation_and_fingerprint():
    assert AugSpec().fingerprint() == AugSpec().fingerprint()
    assert AugSpec().fingerprint() != AugSpec(image_size=192).fingerprint()
    assert AugSpec(scale=[0.08, 1]) == AugSpec()  # lists become tuples: hashable, same fingerprint
    for bad in (dict(image_size=0), dict(scale=(0.5, 0.1)), dict(ratio=(0, 1)), dict(flip_p=2),
                dict(brightness=-1), dict(val_resize=100)):
        with pytest.raises(ValueError, match="invalid AugSpec"):
            AugSpec(**bad)
    with pytest.raises(ValueError, match="height and width"):
        sample_params(AugSpec(), 0, 0, [0], [0], [5])


def test_val_geometry_matches_torchvision():
    spec = AugSpec()
    for h, w in [(375, 500), (500, 333), (256, 256), (300, 1000), (261, 259)]:
        rh, rw, (top, left, ch, cw) = val_geometry(spec, h, w)
        img = torch.zeros(1, h, w)
        resized = T.Resize(256)(img)
        assert resized.shape[1:] == (rh, rw)
        assert T.CenterCrop(224)(torch.arange(rh * rw).view(1, rh, rw))[0, 0, 0].item() == top * rw + left
        assert (ch, cw) == (224, 224)


def test_square_val_resize_is_the_papers_256x256_then_centre_224():
    """--val-resize square: resize to 256x256 (aspect not kept), centre crop 224, like torchvision's
    Resize((256, 256)) + CenterCrop(224); and it is part of the view fingerprint."""
    import torchvision.transforms.v2 as T2

    from pipeline.reader.backends.torch_backend import val_view
    from pipeline.sources.synthetic import synth_image

    spec = AugSpec(val_resize_mode="square")
    for h, w in [(375, 500), (500, 333), (240, 240)]:
        assert val_geometry(spec, h, w) == (256, 256, (16, 16, 224, 224))
    img = torch.from_numpy(synth_image(np.random.default_rng(1), 375, 500)).permute(2, 0, 1).contiguous()
    ours = val_view(img, spec).numpy().astype(float)
    tv = T2.Compose([T2.Resize((256, 256), antialias=True), T2.CenterCrop(224)])(img).permute(1, 2, 0).numpy()
    assert ours.shape == (224, 224, 3) and np.abs(ours - tv).mean() < 1.0
    shorter = val_view(img, AugSpec()).numpy().astype(float)
    assert np.abs(ours - shorter).mean() > 5  # a different view, not a no-op
    assert spec.fingerprint() != AugSpec().fingerprint()
    with pytest.raises(ValueError, match="val_resize_mode"):
        AugSpec(val_resize_mode="stretch")


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (17, 4), (5, 8), (0, 2)])
def test_epoch_order_split(n, world):
    parts = [epoch_order(n, 7, 1, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) <= 1  # padded: equal counts
    allids = np.concatenate(parts) if parts else np.array([])
    assert set(allids.tolist()) == set(range(n)) and len(allids) == (-(-n // world) * world if n else 0)
    exact = np.concatenate([epoch_order(n, 7, 1, r, world, pad=False) for r in range(world)])
    assert sorted(exact.tolist()) == list(range(n))  # unpadded: every sample exactly once
    assert all(p.dtype == np.int64 for p in parts)


def test_epoch_order_seeded_and_different_per_epoch():
    a, b = epoch_order(1000, 1, 0), epoch_order(1000, 1, 0)
    np.testing.assert_array_equal(a, b)
    assert (epoch_order(1000, 1, 1) != a).mean() > 0.9 and (epoch_order(1000, 2, 0) != a).mean() > 0.9
    np.testing.assert_array_equal(epoch_order(10, 1, 0, shuffle=False), np.arange(10))
    with pytest.raises(ValueError, match="rank"):
        epoch_order(10, 0, 0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="epoch"):
        epoch_order(10, 0, -1)
    for seed in (-1, 2**40 + 3):  # any Python int seeds both the order and the views
        assert sorted(epoch_order(50, seed, 0).tolist()) == list(range(50))
        assert len(sample_params(AugSpec(), seed, 0, [1, 2], [30, 30], [40, 40])) == 2


def test_val_resize_follows_image_size():
    """The validation view keeps the paper's 256/224 proportion unless set: at 32 px, resize to 37, not 256."""
    assert AugSpec().val_resize == 256
    assert AugSpec(image_size=32).val_resize == 37
    assert AugSpec(image_size=32, val_resize=48).val_resize == 48
    assert AugSpec(image_size=224).fingerprint() == AugSpec(image_size=224, val_resize=256).fingerprint()
