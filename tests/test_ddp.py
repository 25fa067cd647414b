"""DDP under 2 gloo processes on the CPU: students stay in sync, metrics cover both ranks' samples."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.engine.rundir import RunDir


def read_metrics(run) -> list[dict]:
    return [r.to_json() for r in RunDir(run).read_metrics()]


def _weights_worker(rank: int, world: int, tmp: str) -> None:
    """Train, then save this rank's own in-memory student weights for the parent to compare."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        import pathlib

        from test_loop import FakeLoader, seeded_teacher, tiny_config
        from trainer.engine import loop as loop

        captured, masks = [], []
        original = loop.Distiller.__init__

        def capture(self, *a, **kw):
            original(self, *a, **kw)
            captured.append(self)
            # the dropout mask of MobileNet's classifier at the first step (which units this rank dropped)
            self.students[1].dropout.register_forward_hook(
                lambda m, i, o: masks.append((o == 0).clone()) if not masks else None)

        loop.Distiller.__init__ = capture
        cfg = tiny_config(pathlib.Path(tmp), "dual", epochs=2, batch_size=8)
        train_loader = FakeLoader(num_samples=64, batch_size=8, rank=rank, world_size=world)
        val_loader = FakeLoader(num_samples=32, batch_size=8, seed=99, rank=rank, world_size=world)
        loop.run_training(cfg, train_loader, val_loader, classes=train_loader.classes, teacher=seeded_teacher(),
                          progress=False)
        states = [{k: v.clone() for k, v in m.state_dict().items()} for m in captured[0].students]
        torch.save({"states": states, "mask": masks[0]}, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_keep_students_in_sync(tmp_path):
    mp.spawn(_weights_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # each rank draws its own dropout masks (with the same masks DDP would average correlated gradients)
    assert a["mask"].shape == b["mask"].shape and not torch.equal(a["mask"], b["mask"])
    a, b = a["states"], b["states"]
    assert len(a) == 2
    for sa, sb in zip(a, b):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    recs = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in recs] == [0, 1]
    assert recs[0]["images"] == 64  # 4 steps x 8 images x 2 ranks, summed over ranks
    assert recs[0]["val_images"] == 32
    # the ranks saw different data, so training moved the weights (they did not just stay at init)
    assert recs[-1]["s0"]["loss"] < recs[0]["s0"]["loss"]


@pytest.mark.slow
def test_kdpipe_train_under_torchrun_with_two_cpu_ranks(tmp_path):
    """The real job: torchrun starts 2 ranks, each loads its share of the shards, DDP keeps one model."""
    import subprocess
    import sys

    from pipeline.sources.learnable import make_learnable_tree
    from pipeline.shards.writer import ShardOptions, build_shards
    from trainer.engine.checkpoint import load_checkpoint

    wnids = ["n02869837", "n01749939", "n02488291", "n02107142"]
    make_learnable_tree(tmp_path / "tree", wnids, train_per_class=8, val_per_class=3, size=40, ambiguous_share=0.0)
    build_shards(tmp_path / "tree", tmp_path / "shards", classes=wnids, options=ShardOptions(shard_size=16),
                 workers=1, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "trainer.cli", "train", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "run"),
           "--mode", "hard", "--students", "tiny_cnn,tiny_mobilenet", "--epochs", "2", "--batch-size", "16",
           "--image-size", "32", "--backend", "torch", "--num-workers", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in recs] == [0, 1]
    assert recs[0]["images"] == 32  # 2 ranks x 2 steps x 8 images: the epoch split between the ranks
    import json

    runtime = json.loads((tmp_path / "run" / "config.json").read_text())["runtime"]
    # --batch-size is the global batch: 16 over 2 ranks is 8 a rank; the lr stays the configured one
    assert (runtime["world_size"], runtime["global_batch"], runtime["per_rank_batch"]) == (2, 16, 8)
    assert recs[0]["val_images"] == 12  # every val image once, across both ranks
    assert load_checkpoint(tmp_path / "run" / "checkpoint-last.pt")["epoch"] == 2
