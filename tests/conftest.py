"""Shared fixtures and hardware markers: `gpu` tests skip without CUDA, `dali` tests without DALI."""
from __future__ import annotations

import importlib.util

import pytest

HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken: no GPU tests
        return False


def pytest_collection_modifyitems(config, items):
    cuda = _has_cuda()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "dali" in item.keywords and not HAS_DALI:
            item.add_marker(pytest.mark.skip(reason="needs nvidia-dali (pip install -e '.[dali]')"))


# A few ImageNet-100 wnids (sorted differently from list order on purpose).
SMALL_WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]


@pytest.fixture
def small_wnids() -> list[str]:
    return list(SMALL_WNIDS)
