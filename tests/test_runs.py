"""The run directory and its edges: one job per run, standard exports, TensorBoard, where the time goes,
corrupt samples, damaged checkpoints and a full disk, each ending in a correct result or one clear line."""
from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.core.errors import BusyError, ConfigError
from test_loop import FakeLoader, seeded_teacher, tiny_config
from trainer.cli import main
from trainer.engine.loop import run_training
from trainer.engine.rundir import RunDir

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]
COMMON = ["--image-size", "32", "--batch-size", "16", "--backend", "torch", "--num-workers", "0", "--device", "cpu",
          "--lr", "0.05"]


def cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


def one_line_error(code_output, code: int = 1) -> str:
    """The error line of a failed command: exactly one, last (progress bars may come before it), no traceback."""
    code_, out = code_output
    assert code_ == code, out
    lines = out.replace("\r", "\n").strip().splitlines()
    assert "Traceback" not in out and [ln for ln in lines if ln.startswith("Error:")] == lines[-1:], out
    return lines[-1]


@pytest.fixture(scope="module")
def shards(shared_shards):
    return shared_shards(wnids=WNIDS, train_per_class=8, val_per_class=2, size=40, shard_size=16, learnable=True)


def corrupt_copy(shards, dest, split: str = "train", sample: int = 5):
    """A copy of the shards whose `sample` of `split` no longer decodes (its JPEG header zeroed in the tar)."""
    import shutil

    from pipeline.reader.index import ShardIndex

    shutil.copytree(shards, dest)
    idx = ShardIndex(dest, split)
    with open(idx.shard_path(sample), "r+b") as f:
        f.seek(int(idx.rows["offset"][sample]))
        f.write(b"\0" * 16)
    return dest


# ------------------------------------------------------------------------------------- one job per run

def test_a_second_run_into_the_same_directory_is_refused_while_the_first_runs(tmp_path):
    cfg = tiny_config(tmp_path, "hard", ("tiny_cnn",), epochs=1)
    seen = []

    class Intruder(FakeLoader):
        def __iter__(self):  # mid-epoch of the first run, a second run on the same --out starts
            with pytest.raises(BusyError, match=f"run directory {tmp_path / 'run'} is in use"):
                run_training(cfg, FakeLoader(), FakeLoader(), classes=self.classes, progress=False)
            seen.append(True)
            yield from super().__iter__()

    run_training(cfg, Intruder(), FakeLoader(num_samples=32, seed=99), classes=FakeLoader().classes, progress=False)
    assert seen and len(RunDir(tmp_path / "run").read_metrics()) == 1  # the first run's metrics, not mixed
    assert not (tmp_path / "run" / ".kdpipe.lock").exists()  # released (and removed) on exit


HOLDER = textwrap.dedent("""
    import sys
    from pipeline.core.locks import exclusive_lock
    with exclusive_lock(sys.argv[1] + "/.kdpipe.lock", "run directory"):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def test_another_process_holding_the_run_refuses_train_and_kill_9_frees_it(shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["train", "--shards", shards, "--out", run, "--mode", "hard", "--students", "tiny_cnn", "--epochs",
                "1", *COMMON]
        out = one_line_error(cli(*args))
        assert f"run directory {run} is in use by another kdpipe job" in out
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()  # kill -9: the OS frees the lock, no pid file to clean
        holder.wait()
        holder.stdout.close(), holder.stdin.close()
    assert cli(*args)[0] == 0 and len(RunDir(run).read_metrics()) == 1


# ------------------------------------------------------------------------------------- exports, records

def test_safetensors_export_loads_into_torchvision_and_gives_the_checkpoints_logits(tmp_path):
    import torchvision
    from safetensors.torch import load_file

    from trainer.engine.checkpoint import LAST, load_checkpoint, load_safetensors_weights

    cfg = tiny_config(tmp_path, "dual", ("resnet18", "mobilenet_v2"), epochs=1)
    run_training(cfg, FakeLoader(num_samples=32), FakeLoader(num_samples=16, seed=99), classes=FakeLoader().classes,
                 teacher=seeded_teacher(), progress=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ckpt = load_checkpoint(tmp_path / "run" / LAST)
    for i, name in enumerate(cfg.students):
        plain = getattr(torchvision.models, name)(num_classes=4)  # straight into torchvision's model
        plain.load_state_dict(load_file(tmp_path / "run" / f"student{i}-{name}.safetensors"))
        ref = getattr(torchvision.models, name)(num_classes=4)
        ref.load_state_dict(ckpt["students"][i]["model"])
        torch.testing.assert_close(plain.eval()(x), ref.eval()(x), rtol=0, atol=0)
        _, meta = load_safetensors_weights(tmp_path / "run" / f"student{i}-{name}.safetensors")
        assert json.loads(meta["classes"]) == FakeLoader().classes and meta["model"] == name


def test_final_weights_of_the_same_state_are_the_same_bytes_every_write(tmp_path):
    """safetensors writes its metadata in a HashMap's order, which changes between writes: sorted, the same
    weights always give the same file (and checksum); the file still loads, metadata and all."""
    from safetensors.torch import load_file

    from trainer.engine.checkpoint import load_safetensors_weights, save_final_weights
    from trainer.engine.models import build_model

    state = build_model("tiny_cnn", 3).state_dict()
    classes = ["n01", "chat noir", "caf\u00e9 \"x\""]
    got = {}
    for k in range(6):  # 3 metadata keys: 6 orders, so unsorted, 6 writes all alike by chance is (1/6)^5
        st = save_final_weights(tmp_path / f"r{k}", 0, "tiny_cnn", state, classes)
        got.setdefault("st", set()).add(st.read_bytes())
        got.setdefault("pt", set()).add(st.with_suffix(".pt").read_bytes())
    assert len(got["st"]) == 1 and len(got["pt"]) == 1
    loaded, meta = load_safetensors_weights(st)
    assert json.loads(meta["classes"]) == classes and meta["model"] == "tiny_cnn"
    assert all(torch.equal(loaded[k], v) and torch.equal(load_file(st)[k], v) for k, v in state.items())


def test_metrics_split_the_epoch_into_data_wait_and_compute_and_tensorboard_gets_every_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, "uw-kd", ("tiny_cnn",), epochs=2, tensorboard=True)
    run_training(cfg, FakeLoader(teacher=True), FakeLoader(num_samples=32, seed=99), classes=FakeLoader().classes,
                 progress=False)
    for r in RunDir(tmp_path / "run").read_metrics():
        assert r.data_time_s > 0 and r.compute_time_s > 0 and 0 < r.data_share < 1
        assert r.data_time_s + r.compute_time_s <= r.epoch_time_s * 1.05
    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    steps = [e.step for e in events.Scalars("train/loss/tiny_cnn")]
    assert steps == list(range(8))  # 4 steps an epoch, every one, though the host synced every 2
    assert len(events.Scalars("train/lr")) == 8 and len(events.Scalars("train/w")) == 8
    assert [e.step for e in events.Scalars("epoch/val_top1/tiny_cnn")] == [0, 1]


def test_tensorboard_without_the_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = tiny_config(tmp_path, "hard", ("tiny_cnn",), epochs=1, tensorboard=True)
    with pytest.raises(Exception, match=r"needs the `tb` extra: pip install 'kdpipe\[tb\]'"):
        run_training(cfg, FakeLoader(), FakeLoader(num_samples=32, seed=99), classes=FakeLoader().classes,
                     progress=False)


def test_a_hard_run_given_the_cache_repeats_its_views_like_the_cached_rungs(shards):
    from pipeline.reader.loader import ImageNet100Loader

    loader = ImageNet100Loader(shards, "train", 8, num_workers=0, device="cpu", view_epochs=3)
    assert [loader.aug_epoch(e) for e in range(7)] == [0, 1, 2, 0, 1, 2, 0]


# ------------------------------------------------------------------------------------- bad input

def test_a_corrupt_sample_stops_training_naming_it_or_is_skipped_and_recorded(shards, tmp_path):
    bad = corrupt_copy(shards, tmp_path / "bad")
    args = ["train", "--shards", bad, "--mode", "hard", "--students", "tiny_cnn", "--epochs", "2", *COMMON]
    out = one_line_error(cli(*args, "--out", tmp_path / "a"))
    assert "train sample 5" in out and "train-000000.tar" in out and "--skip-corrupt" in out
    assert cli(*args, "--out", tmp_path / "b", "--skip-corrupt")[0] == 0
    recs = RunDir(tmp_path / "b").read_metrics()
    assert [r.skipped for r in recs] == [1, 1] and recs[0].images == 31  # dropped, not trained on
    rows = (tmp_path / "b" / "skipped.tsv").read_text().splitlines()
    assert rows[0] == "epoch\tsample_id\treason" and [r.split("\t")[:2] for r in rows[1:]] == [["0", "5"], ["1", "5"]]
    # eval: the same rule on the val split
    bad_val = corrupt_copy(shards, tmp_path / "bad_val", split="val", sample=1)
    ev = ["eval", "--run", tmp_path / "b", "--shards", bad_val, "--device", "cpu", "--num-workers", "0"]
    assert "val sample 1" in one_line_error(cli(*ev))
    code, text = cli(*ev, "--skip-corrupt")
    assert code == 0 and "(7 validation images, 1 corrupt ones skipped)" in text


def test_cache_teacher_skip_corrupt_stores_no_teacher_signal_and_lists_the_sample(shards, tmp_path):
    from pipeline.cache.store import TeacherCache
    from trainer.engine.models import build_model

    bad = corrupt_copy(shards, tmp_path / "bad")
    torch.save(build_model("tiny_cnn", 4).state_dict(), tmp_path / "t.pt")
    args = ["cache-teacher", "--shards", bad, "--teacher", "tiny_cnn", "--teacher-weights", tmp_path / "t.pt",
            "--epochs", "2", "--image-size", "32", "--batch-size", "8", "--chunk", "16", "--num-workers", "0",
            "--device", "cpu"]
    assert "train sample 5" in one_line_error(cli(*args, "--out", tmp_path / "a.zarr"))
    assert cli(*args, "--out", tmp_path / "b.zarr", "--skip-corrupt")[0] == 0
    with TeacherCache(tmp_path / "b.zarr") as cache:
        logits, w = cache.lookup(1, np.array([4, 5, 6]))
    assert w[1] == 0.0 and 0 < w[0] < 1 and np.all(logits[1] == 0)
    assert (tmp_path / "b.zarr.skipped.tsv").read_text().splitlines() == ["epoch\tsample_id", "0\t5", "1\t5"]


def test_cache_teacher_option_and_teacher_errors(shards, tmp_path):
    from trainer.engine.models import build_model

    torch.save(build_model("tiny_cnn", 10).state_dict(), tmp_path / "ten.pt")
    base = ["cache-teacher", "--shards", shards, "--teacher", "tiny_cnn", "--out", tmp_path / "c.zarr",
            "--image-size", "32", "--batch-size", "8", "--chunk", "16", "--device", "cpu", "--num-workers", "0"]
    out = one_line_error(cli(*base, "--teacher-weights", tmp_path / "ten.pt", "--topk", "4"), code=2)
    assert "--topk 4 must be below the shards' class count 4" in out
    out = one_line_error(cli(*base, "--teacher-weights", tmp_path / "ten.pt"))
    assert "has 10 outputs; expected 4" in out and not (tmp_path / "c.zarr").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_damaged_or_unsafe_checkpoints_are_one_clear_line(shards, tmp_path):
    args = ["train", "--shards", shards, "--mode", "hard", "--students", "tiny_cnn", "--epochs", "1", *COMMON]
    run = tmp_path / "run"
    assert cli(*args, "--out", run, "--stop-after-steps", "1")[0] == 0
    last = run / "checkpoint-last.pt"
    good = last.read_bytes()
    last.write_bytes(b"")
    assert "is empty (0 bytes)" in one_line_error(cli("train", "--out", run, "--resume"))
    last.write_bytes(good[: len(good) // 2])
    assert "not a readable torch file" in one_line_error(cli("train", "--out", run, "--resume"))
    last.write_bytes(pickle.dumps(_Evil()))
    out = one_line_error(cli("train", "--out", run, "--resume"))
    assert "refused as unsafe" in out and "weights_only=False" not in out
    last.write_bytes(good)
    assert cli("train", "--out", run, "--resume")[0] == 0  # nothing lost: the good checkpoint still resumes


def test_a_full_disk_is_one_line_naming_the_path(shards, tmp_path, monkeypatch):
    import trainer.jobs.train

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))

    monkeypatch.setattr(trainer.jobs.train, "train", full)
    out = one_line_error(cli("train", "--shards", shards, "--out", tmp_path / "run"))
    assert f"no space left on the device writing {tmp_path / 'run' / 'metrics.jsonl'}" in out
    assert "rerun the same command" in out
    monkeypatch.setenv("KDPIPE_DEBUG", "1")
    with pytest.raises(OSError):
        CliRunner().invoke(main, ["train", "--shards", str(shards), "--out", str(tmp_path / "run")],
                           catch_exceptions=False)


@pytest.mark.slow
def test_onnx_export_matches_pytorch_and_refuses_an_unfinished_run(tmp_path):
    pytest.importorskip("onnxruntime")
    cfg = tiny_config(tmp_path, "hard", ("tiny_mobilenet",), epochs=1)
    run_training(cfg, FakeLoader(num_samples=32), FakeLoader(num_samples=16, seed=99), classes=FakeLoader().classes,
                 progress=False)
    code, out = cli("export", "--run", tmp_path / "run", "--format", "onnx", "--batch-size", "3")
    assert code == 0, out
    assert "max |onnx - torch|" in out and (tmp_path / "run" / "student0-tiny_mobilenet.onnx").is_file()
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "run" / "student0-tiny_mobilenet.onnx"))
    assert [i.name for i in session.get_inputs()] == ["images"]
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32), dtype=np.float32)  # another batch size
    assert session.run(None, {"images": x})[0].shape == (5, 4)
    (tmp_path / "run" / "student0-tiny_mobilenet.safetensors").unlink()
    assert "has not finished" in one_line_error(cli("export", "--run", tmp_path / "run"))


def test_export_without_the_extra_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    (tmp_path / "config.json").write_text("{}")
    out = one_line_error(cli("export", "--run", tmp_path), code=2)
    assert "needs the `onnx` extra" in out


def test_a_negative_export_atol_is_refused_before_anything_runs(tmp_path, monkeypatch):
    """No logits can differ by less than 0: a negative --atol would run the export only to refuse every file."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # past the check, the export would stop here
    (tmp_path / "config.json").write_text("{}")
    line = one_line_error(cli("export", "--run", tmp_path, "--out", tmp_path / "x", "--atol", "-1"), code=2)
    assert line.endswith("(--atol): -1.0 must be at least 0") and not (tmp_path / "x").exists()
    assert "needs the `onnx` extra" in one_line_error(cli("export", "--run", tmp_path, "--atol", "0"), code=2)


def test_a_report_into_a_run_being_trained_is_refused(tmp_path):
    from pipeline.core.locks import exclusive_lock

    run = tmp_path / "run"
    with exclusive_lock(run / ".kdpipe.lock", "run directory"):  # as a training job holds it
        out = one_line_error(cli("report", tmp_path, "--out", run))
    assert f"directory {run} is in use" in out


def test_empty_or_unsafe_teacher_weights_are_one_clear_line(shards, tmp_path):
    args = ["train", "--shards", shards, "--out", tmp_path / "r", "--mode", "kd", "--students", "tiny_cnn",
            "--teacher", "tiny_cnn", "--epochs", "1", *COMMON]
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "teacher weights" in (out := one_line_error(cli(*args, "--teacher-weights", tmp_path / "empty.pt"))) \
        and "is empty (0 bytes)" in out
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Evil()))
    out = one_line_error(cli(*args, "--teacher-weights", tmp_path / "evil.pt"))
    assert "refused as unsafe" in out and "weights_only=False" not in out
    for name, data in (("text.pt", b"hello world\n"), ("jpeg.pt", b"\xff\xd8\xff\xe0 JFIF")):  # never "unsafe"
        (tmp_path / name).write_bytes(data)
        out = one_line_error(cli(*args, "--teacher-weights", tmp_path / name))
        assert f"teacher weights {tmp_path / name} is not a torch file" in out and "refused" not in out, out


@pytest.mark.slow
def test_kill_9_then_a_bare_resume_reproduces_the_uninterrupted_run(shards, tmp_path):
    """The run directory is enough: `kdpipe train --out RUN --resume` after a kill -9 mid-run (its lock freed by
    the OS, no pid file) writes the same metrics.jsonl as a run never interrupted (timing fields aside)."""
    import signal
    import time

    from trainer.engine.metrics import TIMING_FIELDS

    args = ["train", "--shards", str(shards), "--mode", "hard", "--students", "tiny_cnn,tiny_mobilenet",
            "--epochs", "3", *map(str, COMMON), "--batch-size", "8"]
    assert cli(*args, "--out", tmp_path / "whole")[0] == 0
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", *args, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file():  # killed once its first epoch is on disk, mid-epoch 2
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(RunDir(run).read_metrics()) < 3
    assert cli("train", "--out", run, "--resume")[0] == 0

    def strip(run_dir):
        return [{k: v for k, v in r.to_json().items() if k not in TIMING_FIELDS} for r in RunDir(run_dir).read_metrics()]
    assert strip(run) == strip(tmp_path / "whole")


def test_resume_before_the_first_checkpoint_starts_the_run_again(tmp_path):
    """Killed during epoch 0 (config.json and maybe a metrics line, no checkpoint): --resume has nothing to
    continue, so the same run starts from its beginning, replacing that attempt's records."""
    cfg = tiny_config(tmp_path, "hard", ("tiny_cnn",), epochs=1)
    whole = run_training(cfg, FakeLoader(), FakeLoader(num_samples=32, seed=99), classes=FakeLoader().classes,
                         progress=False)["final"]
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):  # as if killed between the metrics line and the
        (tmp_path / "run" / name).unlink()  # first checkpoint (the best one is always written after it)
    again = run_training(cfg, FakeLoader(), FakeLoader(num_samples=32, seed=99), classes=FakeLoader().classes,
                         progress=False, resume=True)["final"]
    recs = RunDir(tmp_path / "run").read_metrics()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # replaced, not appended
    assert recs[0].students[0].val_top1 == whole.students[0].val_top1 == again.students[0].val_top1
    other = tiny_config(tmp_path, "hard", ("tiny_cnn",), epochs=2)
    for name in ("checkpoint-last.pt", "checkpoint-best.pt"):
        (tmp_path / "run" / name).unlink()
    with pytest.raises(ConfigError, match="differing fields: epochs: 1 -> 2$"):
        run_training(other, FakeLoader(), FakeLoader(), classes=FakeLoader().classes, progress=False, resume=True)


def _files(run) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file() and p.name != ".kdpipe.lock"}


def test_resume_refuses_a_run_whose_last_checkpoint_is_gone_but_whose_epochs_are_there(shards, tmp_path):
    """Finished epochs (metrics.jsonl, checkpoint-best.pt) but no checkpoint-last.pt: the run had a checkpoint and
    lost it; starting again would replace what it trained, so --resume refuses in one line and changes nothing."""
    run = tmp_path / "run"
    args = ["train", "--shards", shards, "--mode", "hard", "--students", "tiny_cnn", "--epochs", "3", *COMMON]
    assert cli(*args, "--out", run, "--stop-after-steps", "5")[0] == 0  # 2 steps an epoch: epoch 3, step 1
    (run / "checkpoint-last.pt").unlink()
    before = _files(run)
    line = one_line_error(cli("train", "--out", run, "--resume"))
    assert f"{run / 'checkpoint-last.pt'} is missing" in line and "2 finished epoch(s) in metrics.jsonl" in line
    assert "restore checkpoint-last.pt" in line and "--out NEW" in line
    assert _files(run) == before
    (run / "checkpoint-best.pt").unlink()  # two epochs alone show a checkpoint existed (one follows epoch 1)
    assert "holds 2 finished epoch(s) in metrics.jsonl, which" in one_line_error(cli("train", "--out", run, "--resume"))
    (run / "checkpoint-best.pt").write_bytes(before["checkpoint-best.pt"])  # so does a best checkpoint
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    line = one_line_error(cli("train", "--out", run, "--resume"))
    assert "holds 1 finished epoch(s) in metrics.jsonl and checkpoint-best.pt, which" in line


def test_stop_after_steps_counts_the_runs_steps_and_a_checkpoint_already_there_trains_none(shards, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--shards", shards, "--mode", "hard", "--students", "tiny_cnn", "--epochs", "3", *COMMON]
    code, out = cli(*args, "--out", run, "--stop-after-steps", "3")
    assert code == 0 and "stopped after 3 steps" in out, out
    before = _files(run)
    for n in ("3", "2"):
        code, out = cli("train", "--out", run, "--resume", "--stop-after-steps", n)
        assert code == 0 and "nothing trained: the run's checkpoint is already at step 3" in out, out
        assert _files(run) == before
    code, out = cli("train", "--out", run, "--resume", "--stop-after-steps", "5")
    assert code == 0 and "stopped after 5 steps" in out, out
    assert torch.load(run / "checkpoint-last.pt", weights_only=True)["epoch"] == 2


def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(shards, tmp_path, monkeypatch):
    """A KeyboardInterrupt mid-epoch: click's `Aborted!` (exit 1) and, before it, where the last checkpoint is
    and the command that continues from it."""
    from trainer.engine.step import Distiller

    run = tmp_path / "run"
    args = ["train", "--shards", shards, "--mode", "hard", "--students", "tiny_cnn", "--epochs", "3", *COMMON]
    assert cli(*args, "--out", run, "--stop-after-steps", "3")[0] == 0  # epoch 2 step 1 of 2
    step, calls = Distiller.step, []

    def interrupted_at_the_third_step(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(Distiller, "step", interrupted_at_the_third_step)
    code, out = cli("train", "--out", run, "--resume")  # step 4 (epoch 2 saved), interrupted in step 5
    assert code == 1 and out.rstrip().endswith("Aborted!"), out
    assert (f"interrupted: the last checkpoint is the end of epoch 2/3 of {run}; continue with: "
            f"kdpipe train --out {run} --resume") in out
    calls.clear()
    code, out = cli("train", "--out", run, "--resume", "--stop-after-steps", "5")
    assert code == 0 and "stopped after 5 steps" in out  # epoch 3 step 1: the next interrupt names it
    calls[:] = [1, 1]  # interrupted in its first step: the last checkpoint is the one it read
    code, out = cli("train", "--out", run, "--resume")
    assert code == 1 and f"interrupted: the last checkpoint is epoch 3/3 step 1/2 of {run}" in out, out
    fresh = tmp_path / "fresh"
    calls[:] = [1, 1]  # interrupted in the first step
    code, out = cli(*args, "--out", fresh)
    assert code == 1 and f"interrupted before the first checkpoint of {fresh}" in out, out


@pytest.mark.slow
def test_sigterm_prints_the_resume_line_and_exits_143(shards, tmp_path):
    """SIGTERM (preemption, `kill PID`) to the process group, loader workers included: the same line, exit 143,
    no traceback, and the run resumes."""
    import signal
    import time

    run = tmp_path / "run"
    args = ["train", "--shards", str(shards), "--mode", "hard", "--students", "tiny_cnn", "--epochs", "500",
            *map(str, COMMON), "--num-workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", *args, "--out", str(run)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint-last.pt").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled"
            time.sleep(0.05)  # another process writes it: polled, no event to wait on
    finally:  # right after its first checkpoint the run is mid-way through 500 epochs
        os.killpg(proc.pid, signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert "Traceback" not in err and f"continue with: kdpipe train --out {run} --resume" in err, err
    assert cli("train", "--out", run, "--resume", "--stop-after-steps", "1")[0] == 0
