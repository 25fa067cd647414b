"""Frozen golden values of the functions every view and order depend on.

A teacher cache holds logits of exactly the views (seed, epoch, id) -> crop, flip, colour, and resumable
runs and shards depend on the epoch order and the shard shuffle. A change of numpy or of the code that
alters any of these silently invalidates existing caches and resumes: it must fail here first (then bump
AUG_RNG_VERSION / the shard format version and update these values on purpose).
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.augment import AUG_RNG_VERSION, AugSpec, epoch_order, sample_params


def test_sample_params_golden_values():
    p = sample_params(AugSpec(), 7, 3, np.array([0, 1, 42, 123456789]), np.array([375, 500, 333, 64]),
                      np.array([500, 333, 500, 4000]))
    assert p.top.tolist() == [68, 199, 89, 0]
    assert p.left.tolist() == [105, 100, 260, 1957]
    assert p.height.tolist() == [292, 298, 232, 64]  # the last one: the centre-crop fallback of a 64x4000 strip
    assert p.width.tolist() == [376, 228, 196, 85]
    assert p.flip.tolist() == [False, False, True, True]
    np.testing.assert_allclose(p.brightness, [0.7332894, 1.054577, 0.6314697, 0.6364307], rtol=1e-6)
    np.testing.assert_allclose(p.contrast, [0.7789868, 1.218405, 0.6882556, 0.6029539], rtol=1e-6)
    np.testing.assert_allclose(p.saturation, [1.187417, 0.7281879, 0.7102086, 1.291569], rtol=1e-6)
    assert AUG_RNG_VERSION == 1


@pytest.mark.parametrize("args,expected", [
    ((10, 3, 2), [9, 3, 2, 1, 8, 6, 5, 0, 4, 7]),
    ((10, 2**40 + 5, 0), [0, 5, 4, 1, 6, 9, 2, 7, 3, 8]),
])
def test_epoch_order_golden_values(args, expected):
    assert epoch_order(*args).tolist() == expected


def test_epoch_order_rank_split_golden_values():
    assert epoch_order(10, 3, 2, rank=1, world_size=3).tolist() == [3, 8, 0, 9]  # padded: wraps to id 9


def test_shard_shuffle_golden_values():
    from pipeline.sources.imagenet import SourceFile
    from pipeline.shards.writer import ordered_files

    files = [SourceFile(f"train/n{i % 3}/{i:03d}.JPEG", f"n{i % 3}", i % 3) for i in range(10)]
    assert [f.rel[-8:-5] for f in ordered_files(files, "train", 0)] == \
        ["001", "007", "006", "002", "009", "004", "008", "000", "005", "003"]
