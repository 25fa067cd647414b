"""Every error one line, wherever raised (issue 18, item 5; and the unclear cases of item 7).

Each error class is driven through the `kdpipe` CLI with DataLoader workers on (--num-workers 1 or 2): the exit
code, exactly one `Error:` line naming the culprit, no traceback, no "DataLoader worker process" text.
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.core.errors import CacheMismatchError, CorruptSampleError
from trainer.cli import main

from clitools import cli, error_line
from conftest import flip_jpeg_byte

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]
TRAIN = ["--mode", "hard", "--students", "tiny_cnn", "--epochs", "1", "--image-size", "24", "--batch-size", "8",
         "--backend", "torch", "--num-workers", "2", "--device", "cpu", "--seed", "0"]


@pytest.fixture(scope="module")
def built(shared_shards, tmp_path_factory) -> Path:
    """`shards` and `tree` (links to the shared tiny set: read-only), `classes.txt` and a `teacher.pt`."""
    shards = shared_shards(wnids=WNIDS, train_per_class=8, val_per_class=2, size=(40, 56), shard_size=8)
    root = tmp_path_factory.mktemp("errors")
    (root / "shards").symlink_to(shards, target_is_directory=True)
    (root / "tree").symlink_to(shards.parent / "tree", target_is_directory=True)
    (root / "classes.txt").write_text("\n".join(WNIDS) + "\n")
    from trainer.engine.models import build_model

    torch.save(build_model("tiny_cnn", len(WNIDS)).state_dict(), root / "teacher.pt")
    return root


@pytest.fixture(scope="module")
def stopped_run(built, tmp_path_factory) -> Path:
    """A run stopped in its second epoch: a checkpoint and one metrics line."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    cli("train", "--shards", built / "shards", "--out", run, *TRAIN[:5], "2", *TRAIN[6:], "--stop-after-steps", "5",
        code=0)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    return run


# ---------------------------------------------------------------- errors raised in DataLoader workers

class _Raises(torch.utils.data.Dataset):
    def __init__(self, error: Exception):
        self.error = error

    def __len__(self) -> int:
        return 2

    def __getitem__(self, k: int):
        raise self.error


def test_a_worker_error_comes_back_as_the_same_class_message_and_attributes():
    from pipeline.reader.backends.base import CarryErrors, WorkerTraceback, raise_carried

    err = CacheMismatchError("c.zarr", ["seed"], ["seed: cache has 0, expected 1"])  # a constructor of 3 args
    dl = torch.utils.data.DataLoader(CarryErrors(_Raises(err)), batch_size=None, num_workers=1)
    with pytest.raises(CacheMismatchError) as got:
        list(map(raise_carried, dl))
    assert str(got.value) == str(err) and got.value.fields == ["seed"]
    assert isinstance(got.value.__cause__, WorkerTraceback) and "Traceback" in str(got.value.__cause__)
    # a programming error stays loud, PyTorch's way
    dl = torch.utils.data.DataLoader(CarryErrors(_Raises(KeyError("bug"))), batch_size=None, num_workers=1)
    with pytest.raises(KeyError, match="DataLoader worker"):
        list(map(raise_carried, dl))


@pytest.mark.parametrize("command", ["train", "cache-teacher"])
def test_a_corrupt_sample_read_in_a_worker_is_one_line_naming_it(built, tmp_path, command):
    shards = Path(shutil.copytree(built / "shards", tmp_path / "shards"))
    path = flip_jpeg_byte(shards, 13)
    if command == "train":
        args = ["train", "--shards", shards, "--out", tmp_path / "run", *TRAIN]
    else:
        args = ["cache-teacher", "--shards", shards, "--out", tmp_path / "c.zarr", "--teacher", "tiny_cnn",
                "--teacher-weights", built / "teacher.pt", "--epochs", "1", "--image-size", "24", "--batch-size", "8",
                "--chunk", "16", "--backend", "torch", "--num-workers", "2", "--device", "cpu"]
    line = error_line(cli(*args, code=1))
    assert line.startswith(f"Error: train sample 13 in shard {path}: its JPEG bytes fail their crc32 check"), line


def _fail_decoding(monkeypatch) -> None:
    """Every decode in the torch backend's CPU workers fails (a patch the forked workers inherit)."""
    import pipeline.reader.backends.torch_backend as tb

    def broken(data, expected, box=None):
        raise RuntimeError("decoder says no")

    monkeypatch.setattr(tb, "decode_region", broken)


def test_a_decode_error_in_a_streamed_loaders_worker_is_one_line(built, tmp_path, monkeypatch):
    _fail_decoding(monkeypatch)
    url = (built / "shards").resolve().as_uri()
    line = error_line(cli("train", "--shards", url, "--out", tmp_path / "run", *TRAIN, code=1))
    assert "train sample" in line and "decoder says no" in line and "Caught" not in line


@pytest.mark.dali
@pytest.mark.slow
def test_an_error_raised_in_a_dali_callback_is_its_one_line(built, tmp_path, monkeypatch):
    from pipeline.reader.backends import dali_backend as dali_backend

    def source(self):
        raise CorruptSampleError("train sample 3 in shard X.tar: raised inside DALI's callback")

    monkeypatch.setattr(dali_backend._Stream, "source", source)
    args = ["train", "--shards", built / "shards", "--out", tmp_path / "run", *TRAIN]
    args[args.index("torch")] = "dali"
    line = error_line(cli(*args, code=1))
    assert line == "Error: train sample 3 in shard X.tar: raised inside DALI's callback"


# ---------------------------------------------------------------- read-only outputs name the path

@pytest.fixture
def read_only(tmp_path):
    """A directory nothing can be written into: mode 0555, or (root ignores modes) the immutable attribute."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    immutable = False
    try:
        (d / "probe").touch()
    except PermissionError:
        pass
    else:
        (d / "probe").unlink()
        immutable = shutil.which("chattr") is not None and \
            subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
        if not immutable:
            d.chmod(0o755)
            pytest.skip("cannot make a read-only directory here (root, and no chattr +i)")
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    d.chmod(0o755)


def test_a_read_only_out_is_one_line_naming_the_path(built, stopped_run, read_only):
    shards = built / "shards"
    cases = {
        "train": ["train", "--shards", shards, *TRAIN],
        "shard": ["shard", "--imagenet", built / "tree", "--classes", built / "classes.txt", "--workers", "1"],
        "cache-teacher": ["cache-teacher", "--shards", shards, "--teacher", "tiny_cnn", "--teacher-weights",
                          built / "teacher.pt", "--epochs", "1", "--image-size", "24", "--batch-size", "8", "--chunk",
                          "16", "--num-workers", "1", "--device", "cpu"],
        "report": ["report", stopped_run],
        "synth": ["synth", "--classes", built / "classes.txt", "--size", "24", "24", "--train-per-class", "1"],
    }
    for name, args in cases.items():
        for out in (read_only, read_only / "new"):  # into the read-only directory, or a new one inside it
            target = out / "c.zarr" if name == "cache-teacher" else out
            line = error_line(cli(*args, "--out", target, code=1))
            assert line.startswith(f"Error: {read_only}") and "(a read-only or protected location)" in line, \
                (name, line)
    assert os.listdir(read_only) == []


def test_a_permission_error_reading_an_input_names_it_and_debug_shows_the_traceback(built, tmp_path, monkeypatch):
    import trainer.jobs.train

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "shards" / "train-000000.tar"))

    monkeypatch.setattr(trainer.jobs.train, "train", denied)
    line = error_line(cli("train", "--shards", built / "shards", "--out", tmp_path / "run", code=1))
    assert line.startswith(f"Error: {tmp_path / 'shards' / 'train-000000.tar'}: Permission denied")
    res = CliRunner(env={"KDPIPE_DEBUG": "yes"}).invoke(main, ["train", "--shards", str(built / "shards"), "--out",
                                                                 str(tmp_path / "run")])
    assert isinstance(res.exception, PermissionError)


# ---------------------------------------------------------------- limits of the data and the models, up front

@pytest.mark.parametrize("field, value, why", [("label", 4, "outside 0..3 (the manifest's 4 classes)"),
                                               ("label", -1, "outside 0..3"), ("height", 0, "below 1 pixel"),
                                               ("width", 0, "below 1 pixel")])
def test_an_index_row_with_an_impossible_label_or_size_is_one_line_naming_file_and_sample(built, tmp_path, field,
                                                                                          value, why):
    shards = Path(shutil.copytree(built / "shards", tmp_path / "shards"))
    rows = np.load(shards / "train.index.npy")
    rows[field][6] = value
    np.save(shards / "train.index.npy", rows)
    line = error_line(cli("train", "--shards", shards, "--out", tmp_path / "run", *TRAIN, code=1))
    assert f"{shards / 'train.index.npy'}: sample 6 has {field} {value}, {why}" in line
    out = cli("verify", "--shards", shards, "--workers", "1", code=1)
    assert f"sample 6 has {field} {value}" in out


def test_batchnorm_students_with_one_sample_batches_are_refused_before_training(built, tmp_path):
    from trainer.engine.models import check_one_sample_batches

    args = [a if a != "tiny_cnn" else "resnet18" for a in TRAIN]
    args[args.index("--batch-size") + 1] = "1"
    line = error_line(cli("train", "--shards", built / "shards", "--out", tmp_path / "run", *args, code=2))
    assert "--batch-size 1 gives 1 sample per rank: resnet18 cannot train on it at --image-size 24" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    check_one_sample_batches(["resnet18", "mobilenet_v2"], 4, 224)  # 7x7 maps: one sample is enough
    check_one_sample_batches(["tiny_cnn"], 4, 24)


def test_a_damaged_metrics_file_is_the_same_one_line_for_resume_and_report(stopped_run, tmp_path):
    run = Path(shutil.copytree(stopped_run, tmp_path / "run"))
    metrics = run / "metrics.jsonl"
    good = metrics.read_bytes()
    for damage, what in ((b'{"epoch": 1, garbage\n', "not a metrics line (Expecting"),
                         (b"\xff\xfe\n", "not a metrics line (not UTF-8 text at byte"),
                         (b"[1, 2]\n", "not a metrics line (")):
        metrics.write_bytes(good + damage)
        resume = error_line(cli("train", "--out", run, "--resume", "--num-workers", "1", code=1))
        assert resume.startswith(f"Error: {metrics}:2: {what}") and resume.endswith("fix or remove that line")
        assert error_line(cli("report", run, "--out", tmp_path / "rep", code=1)) == resume
    metrics.write_bytes(good)
    assert "done:" in cli("train", "--out", run, "--resume", "--num-workers", "1", code=0)


# ---------------------------------------------------------------- item 7: the unclear cases, decided

@pytest.mark.parametrize("flags, text", [
    (["--weight-decay", "-0.1"], "invalid training config: --weight-decay (got -0.1) must not be negative"),
    (["--lr", "-0.1"], "invalid training config: --lr must be positive (got -0.1)"),
    (["--alpha", "-1"], "--alpha (got -1) must not be negative: a loss term would be maximised"),
    (["--momentum", "1.0"], "--momentum must be in [0, 1)"),
    (["--momentum", "-0.5"], "--momentum must be in [0, 1)"),
    (["--momentum", "0", "--nesterov"], "above 0 with --nesterov"),
])
def test_optimiser_settings_out_of_range_are_refused_alike(built, tmp_path, flags, text):
    line = error_line(cli("train", "--shards", built / "shards", "--out", tmp_path / "run", *TRAIN, *flags, code=2))
    assert text in line and not (tmp_path / "run").exists()
    assert "got 0)" not in line  # only the settings at fault are named


def test_kdpipe_debug_is_a_switch_with_words(built, tmp_path):
    args = ["train", "--shards", built / "shards", "--out", tmp_path / "run", *TRAIN, "--lr", "-1"]
    for off in ("0", "false", "No", "off", ""):
        assert "--lr must be positive" in error_line(cli(*args, code=2, env={"KDPIPE_DEBUG": off}))
    for on in ("1", "true", "YES", "on"):
        res = CliRunner(env={"KDPIPE_DEBUG": on}).invoke(main, [str(a) for a in args])
        assert type(res.exception).__name__ == "ConfigError", on
    line = error_line(cli(*args, code=2, env={"KDPIPE_DEBUG": "maybe"}))
    assert line.startswith("Error: KDPIPE_DEBUG='maybe': give 1, true, yes or on")


def test_a_learnable_file_that_is_not_a_description_is_named(stopped_run, tmp_path):
    bad = tmp_path / "learnable.json"
    for text in ("not json", "[1, 2]"):
        bad.write_text(text)
        line = error_line(cli("report", stopped_run, "--out", tmp_path / "rep", "--learnable", bad, code=2))
        assert line.startswith(f"Error: --learnable {bad}: not a learnable dataset's description")
    line = error_line(cli("report", stopped_run, "--out", tmp_path / "rep", "--learnable", tmp_path, code=2))
    assert f"--learnable {tmp_path / 'learnable.json'}" in line
    assert not (tmp_path / "rep").exists()


def test_a_train_split_with_no_samples_or_one_class_is_one_line_before_any_model(tmp_path):
    from PIL import Image

    one = tmp_path / "one" / "train" / "cats"
    one.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 0, 0)).save(one / f"{i}.jpg")
    empty = tmp_path / "empty" / "train" / "cats"
    empty.mkdir(parents=True)
    (empty / "zero.jpg").write_bytes(b"")  # rejected by `shard`: the split ends with 0 samples
    cli("shard", "--imagefolder", tmp_path / "one", "--out", tmp_path / "s1", "--val-share", "0.25", "--workers", "1")
    out = cli("shard", "--imagefolder", tmp_path / "empty", "--out", tmp_path / "s0", "--workers", "1")
    assert "warning: the train split holds 0 samples, so `kdpipe train` will refuse these shards (see " in out
    torch.save(torch.nn.Linear(1, 1).state_dict(), tmp_path / "t.pt")  # never loaded: the shards are refused first
    cache = ["--teacher", "tiny_cnn", "--teacher-weights", tmp_path / "t.pt", "--epochs", "1", "--image-size", "24",
             "--batch-size", "2", "--chunk", "4", "--device", "cpu", "--num-workers", "0"]
    for shards, text in ((tmp_path / "s1", "the shards hold 1 class; a classifier"),
                         (tmp_path / "s0", "the train split has 0 samples (see its rejected.tsv")):
        line = error_line(cli("cache-teacher", "--shards", shards, "--out", tmp_path / "c.zarr", *cache, code=1))
        assert f"{shards}: {text}" in line
        assert not (tmp_path / "c.zarr").exists()
    line = error_line(cli("train", "--shards", tmp_path / "s1", "--out", tmp_path / "run", *TRAIN, code=1))
    assert f"{tmp_path / 's1'}: the shards hold 1 class" in line


def test_an_out_below_a_file_is_one_line_naming_the_path(built, tmp_path):
    (tmp_path / "afile").write_text("mine")
    line = error_line(cli("train", "--shards", built / "shards", "--out", tmp_path / "afile" / "sub", *TRAIN, code=1))
    assert f"{tmp_path / 'afile' / 'sub'}: not a directory (a part of this path is a file)" in line
    line = error_line(cli("cache-teacher", "--shards", built / "shards", "--out", tmp_path / "afile" / "t.zarr",
                          "--teacher", "tiny_cnn", "--teacher-weights", built / "teacher.pt", "--epochs", "1",
                          "--image-size", "24", "--batch-size", "8", "--chunk", "8", "--device", "cpu",
                          "--num-workers", "0", code=1))
    assert f"{tmp_path / 'afile'} exists and is not a directory kdpipe can make or use" in line
    assert (tmp_path / "afile").read_text() == "mine"
