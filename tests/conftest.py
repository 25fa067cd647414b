"""Shared fixtures and hardware markers: `gpu` tests skip without CUDA, `dali` tests without DALI."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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


def build_tiny_shards(root: Path, wnids: list[str], *, train_per_class: int, val_per_class: int, size,
                      shard_size: int | None = None, seed: int = 0, learnable: bool = False,
                      ambiguous_share: float = 0.0) -> Path:
    """root/tree (synthetic JPEGs, or the learnable generator's) and root/shards written from it, one worker, no
    progress bar; returns root/shards. The one recipe the test files share (the tree stays for resume tests)."""
    from pipeline.shards.writer import ShardOptions, build_shards

    if learnable:
        from pipeline.sources.learnable import make_learnable_tree

        make_learnable_tree(root / "tree", wnids, train_per_class=train_per_class, val_per_class=val_per_class,
                            size=size, ambiguous_share=ambiguous_share, seed=seed)
    else:
        from pipeline.sources.synthetic import make_imagenet_tree

        make_imagenet_tree(root / "tree", wnids, train_per_class=train_per_class, val_per_class=val_per_class,
                           size=size, seed=seed)
    options = ShardOptions(shard_size=shard_size) if shard_size else ShardOptions()
    build_shards(root / "tree", root / "shards", classes=wnids, options=options, workers=1, progress=False)
    return root / "shards"


def flip_jpeg_byte(shard_dir: Path, sample_id: int) -> Path:
    """Flip one bit in the middle of a train JPEG's entropy-coded data (it still decodes, but its crc32 no
    longer matches the index); its shard's path."""
    from pipeline.reader.index import ShardIndex

    idx = ShardIndex(shard_dir, "train", check_crc=False)
    path, offset, size = idx.shard_path(sample_id), int(idx.rows["offset"][sample_id]), int(idx.rows["size"][sample_id])
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)[0]
        f.seek(offset + size // 2)
        f.write(bytes([byte ^ 0x04]))
    return path


@pytest.fixture(scope="session")
def shared_shards(tmp_path_factory):
    """`shared_shards(wnids=..., train_per_class=..., ...)`: the shard directory of `build_tiny_shards` for those
    arguments, built once per session and shared by every test that asks for the same one. Read-only: a test that
    damages shards copies them first."""
    built: dict[tuple, Path] = {}

    def get(**kwargs) -> Path:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        if key not in built:
            built[key] = build_tiny_shards(tmp_path_factory.mktemp("shards"), **kwargs)
        return built[key]

    return get
