"""The extension points, each used the way a newcomer would: a toy backend, a toy loss term and a toy model are
registered in a few lines, a 1-epoch `kdpipe train` uses them, and the test checks they really ran."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from clitools import cli
from trainer.engine.rundir import RunDir

WNIDS = ["n02869837", "n01749939"]
COMMON = ["--epochs", "1", "--image-size", "24", "--batch-size", "8", "--num-workers", "0", "--device", "cpu",
          "--mode", "hard"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pipeline.shards.writer import ShardOptions, build_shards
    from pipeline.sources.learnable import make_learnable_tree

    root = tmp_path_factory.mktemp("ext")
    make_learnable_tree(root / "tree", WNIDS, train_per_class=8, val_per_class=2, size=32, ambiguous_share=0.0)
    build_shards(root / "tree", root / "shards", classes=WNIDS, options=ShardOptions(shard_size=16), workers=1,
                 progress=False)
    return root / "shards"


def test_a_toy_backend_is_one_class_and_one_register_line(shards, tmp_path):
    from pipeline.reader.backends.registry import BackendEntry, backend_choices, register, unregister
    from pipeline.reader.backends.torch_backend import TorchBackend

    class ToyBackend(TorchBackend):  # the torch backend's pixels, counted
        name, batches = "toy", []

        def iter_batches(self, ids, aug_epoch, batch_size, **kw):
            for images, labels, batch_ids in super().iter_batches(ids, aug_epoch, batch_size, **kw):
                ToyBackend.batches.append(len(batch_ids))
                yield images, labels, batch_ids

    register(BackendEntry("toy", ToyBackend))
    try:
        assert "toy" in backend_choices()
        cli("train", "--shards", shards, "--out", tmp_path / "run", "--students", "tiny_cnn", "--backend", "toy",
            *COMMON)
    finally:
        unregister("toy")
    assert sum(ToyBackend.batches) == 16 + 4  # one training epoch and the validation pass, through the toy
    assert RunDir(tmp_path / "run").read_metrics()[0].students[0].val_top1 is not None
    assert "toy" not in backend_choices()


def test_a_toy_loss_term_is_one_function_and_one_register_line(shards, tmp_path):
    from trainer.engine.losses import LossTerm, register_term, term_keys, unregister_term

    calls = []

    def toy(x):  # the mean squared logit, weighted 0.5 whatever the preset
        calls.append(x.student.shape[0])
        return x.student.float().pow(2).mean()

    register_term(LossTerm("toy", toy, weight=lambda cfg: 0.5))
    try:
        assert term_keys() == ("loss", "hard", "teacher", "peer", "toy", "w")
        cli("train", "--shards", shards, "--out", tmp_path / "run", "--students", "tiny_cnn", "--backend", "torch",
            *COMMON)
    finally:
        unregister_term("toy")
    assert sum(calls) == 16
    # read back without the term registered: the unknown key is kept in the student's terms
    s = RunDir(tmp_path / "run").read_metrics()[0].students[0]
    assert s.terms["toy"] > 0 and s.toy == s.terms["toy"]
    assert s.loss == pytest.approx(1.0 * s.hard + 0.5 * s.toy, rel=1e-5)  # --mode hard: alpha 1, beta = gamma = 0


def test_a_toy_model_is_one_register_line(shards, tmp_path):
    from trainer.engine.models import MODELS, register_model, unregister_model

    class ToyNet(nn.Module):
        forwards = 0

        def __init__(self, num_classes: int):
            super().__init__()
            self.fc = nn.Linear(3, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ToyNet.forwards += 1
            return self.fc(x.mean(dim=(2, 3)))

    register_model("toy_net", ToyNet)
    try:
        cli("train", "--shards", shards, "--out", tmp_path / "run", "--students", "toy_net", "--backend", "torch",
            *COMMON)
    finally:
        unregister_model("toy_net")
    assert ToyNet.forwards >= 2 + 1  # two training steps and a validation batch
    assert (tmp_path / "run" / "student0-toy_net.safetensors").is_file()
    assert RunDir(tmp_path / "run").read_metrics()[0].students[0].name == "toy_net"
    assert "toy_net" not in MODELS


def test_auto_picks_torch_everywhere_until_dali_has_run_on_a_gpu(monkeypatch):
    """`auto` is the lowest available auto_rank that fits the device: torch on CPU and CUDA alike (DALI, even
    installed, only by name), and a registered entry with a lower rank and its device wins."""
    from dataclasses import replace

    from pipeline.reader.backends import registry

    dali = registry.backend_entry("dali")
    monkeypatch.setitem(registry._REGISTRY, "dali", replace(dali, available=lambda: True))  # as if installed
    assert registry.choose("auto", cuda=False) == "torch"
    assert registry.choose("auto", cuda=True) == "torch"
    assert registry.choose("dali", cuda=True) == "dali"
    registry.register(registry.BackendEntry("fast", object, auto_rank=1, cuda_only=True))
    try:
        assert registry.choose("auto", cuda=True) == "fast"
        assert registry.choose("auto", cuda=False) == "torch"
    finally:
        registry.unregister("fast")
