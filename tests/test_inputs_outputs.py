"""Issue 18, invariants 1 and 2, end to end through the `kdpipe` CLI on tiny data.

Every input identified: a run records the sha256 of its shards' manifest, teacher cache fingerprint and teacher
weights (absolute paths); `train --resume`, `eval --run` and `report` refuse other content in one line naming
both. Every output claimed: a job writes only into a directory it made or that carries its marker, and a
resumed run leaves every file a clean run leaves. Each test checks the exit code, the one line, and that no
file a user had was changed.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from clitools import cli

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]
TR = ["--mode", "hard", "--students", "tiny_cnn", "--epochs", "1", "--image-size", "24", "--batch-size", "8",
      "--backend", "torch", "--device", "cpu"]


def refused(*args, code: int) -> str:
    """The one `Error: ...` line of a refused command (and it is the last line)."""
    out = cli(*args, code=code)
    lines = out.replace("\r", "\n").strip().splitlines()
    assert [ln for ln in lines if ln.startswith("Error: ")] == lines[-1:], out
    return lines[-1]


def snapshot(d: Path) -> dict[str, str]:
    """sha256 of every file below d, by relative path (what "nothing changed" is checked against)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(shared_shards, tmp_path_factory) -> dict[str, Path]:
    """sh1 and sh1b: the same classes and counts, other images (other seeds); sh3: three classes (shared tiny
    sets: read-only); two teachers (t1, t2: final weights of two tiny hard runs on sh1)."""
    root = tmp_path_factory.mktemp("io")
    out = {}
    for name, seed, wnids in (("sh1", 0, WNIDS), ("sh1b", 1, WNIDS), ("sh3", 0, WNIDS[:3])):
        out[name] = shared_shards(wnids=wnids, train_per_class=8, val_per_class=2, size=32, shard_size=16, seed=seed,
                                  learnable=True, ambiguous_share=0.25)
        out[f"tree-{name}"] = out[name].parent / "tree"
    for t, seed in (("t1", 0), ("t2", 1)):
        cli("train", *TR, "--num-workers", "0", "--shards", out["sh1"], "--out", root / t, "--seed", seed)
        out[t] = root / t / "student0-tiny_cnn.pt"
    out["root"] = root
    return out


# ------------------------------------------------------------------------------------ every input identified

def test_resume_on_other_shards_is_refused_naming_both_and_a_bare_resume_continues(data, tmp_path):
    run = tmp_path / "R"
    cli("train", *TR, "--num-workers", "1", "--shards", data["sh1"], "--out", run, "--stop-after-steps", "1")
    before = snapshot(run)
    line = refused("train", "--out", run, "--resume", "--shards", data["sh1b"], "--num-workers", "1", code=2)
    assert f"--shards {data['sh1b']}: manifest sha256" in line and "differs from the run's" in line
    assert f"{data['sh1']}, recorded in {run / 'config.json'}" in line
    line = refused("train", "--out", run, "--resume", "--teacher-weights", data["t2"], code=2)
    assert f"--teacher-weights {data['t2']} given, but the run used no --teacher-weights" in line
    assert snapshot(run) == before
    cli("train", "--out", run, "--resume", "--num-workers", "1")  # the recorded (absolute) shards
    config = json.loads((run / "config.json").read_text())
    assert config["shards"] == str(data["sh1"]) and config["runtime"]["inputs"]["shards"]["path"] == str(data["sh1"])


def test_resume_with_another_teacher_cache_or_teacher_weights_is_refused(data, tmp_path):
    caches = {}
    for t in ("t1", "t2"):
        caches[t] = tmp_path / f"c-{t}.zarr"
        cli("cache-teacher", "--shards", data["sh1"], "--out", caches[t], "--teacher", "tiny_cnn", "--teacher-weights",
            data[t], "--epochs", "1", "--image-size", "24", "--batch-size", "8", "--chunk", "16", "--backend",
            "torch", "--num-workers", "0", "--device", "cpu")
    run = tmp_path / "Rc"
    cli("train", *TR, "--num-workers", "1", "--shards", data["sh1"], "--out", run, "--teacher-cache", caches["t1"],
        "--stop-after-steps", "1")
    before = snapshot(run)
    line = refused("train", "--out", run, "--resume", "--teacher-cache", caches["t2"], "--num-workers", "1", code=2)
    assert f"--teacher-cache {caches['t2']}: fingerprint sha256" in line and str(caches["t1"]) in line

    kd = tmp_path / "Rk"
    args = ["--mode", "kd", "--teacher", "tiny_cnn", "--students", "tiny_cnn", "--epochs", "1", "--image-size", "24",
            "--batch-size", "8", "--backend", "torch", "--device", "cpu", "--num-workers", "1"]
    cli("train", *args, "--shards", data["sh1"], "--out", kd, "--teacher-weights", data["t1"], "--stop-after-steps", 1)
    kd_before = snapshot(kd)
    line = refused("train", "--out", kd, "--resume", "--teacher-weights", data["t2"], "--num-workers", "1", code=2)
    assert f"--teacher-weights {data['t2']}: file sha256" in line and f"({data['t1']}, recorded in" in line
    assert snapshot(run) == before and snapshot(kd) == kd_before

    # the run's own input replaced under its recorded path: a bare --resume names it as the run's (no flag was
    # given to blame); the flag, given, is still named as the flag
    shutil.rmtree(caches["t1"])
    shutil.copytree(caches["t2"], caches["t1"])
    line = refused("train", "--out", run, "--resume", "--num-workers", "1", code=2)
    assert line.startswith(f"Error: the run's teacher cache {caches['t1']}: fingerprint sha256 ") and \
        "--teacher-cache" not in line and "it changed since the run read it; restore it" in line, line
    line = refused("train", "--out", run, "--resume", "--teacher-cache", caches["t1"], "--num-workers", "1", code=2)
    assert line.startswith(f"Error: --teacher-cache {caches['t1']}: fingerprint sha256 "), line
    weights = tmp_path / "teacher.pt"
    shutil.copy(data["t1"], weights)
    kd2 = tmp_path / "Rk2"
    cli("train", *args, "--shards", data["sh1"], "--out", kd2, "--teacher-weights", weights, "--stop-after-steps", 1)
    shutil.copy(data["t2"], weights)
    line = refused("train", "--out", kd2, "--resume", code=2)
    assert line.startswith(f"Error: the run's teacher weights {weights}: file sha256 "), line


def test_resume_on_shards_of_other_classes_names_the_shards_not_the_teacher(data, tmp_path):
    """The recorded shards are checked before the teacher is loaded for the shards' classes: other shards are
    named as such, whatever they break later (a teacher of 4 classes for 3)."""
    run = tmp_path / "R"
    args = ["--mode", "kd", "--teacher", "tiny_cnn", "--students", "tiny_cnn", "--epochs", "1", "--image-size", "24",
            "--batch-size", "8", "--backend", "torch", "--device", "cpu", "--num-workers", "0"]
    cli("train", *args, "--shards", data["sh1"], "--out", run, "--teacher-weights", data["t1"], "--stop-after-steps", 1)
    before = snapshot(run)
    line = refused("train", "--out", run, "--resume", "--shards", data["sh3"], code=2)
    assert line.startswith(f"Error: --shards {data['sh3']}: manifest sha256 ") and "differs from the run's" in line
    assert "teacher" not in line and snapshot(run) == before


def test_paths_are_stored_absolute_and_eval_refuses_shards_changed_under_the_run(data, tmp_path, monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copytree(data["sh1"], work / "sh")
    shutil.copytree(data["sh1b"], elsewhere / "sh")  # what a relative "sh" would find from elsewhere/
    monkeypatch.chdir(work)
    cli("train", *TR, "--num-workers", "0", "--shards", "sh", "--out", "R")
    assert json.loads((work / "R" / "config.json").read_text())["shards"] == str(work / "sh")
    monkeypatch.chdir(elsewhere)
    last = cli("eval", "--run", "../work/R", "--backend", "torch", "--num-workers", "0", "--device", "cpu")
    assert "(8 validation images)" in last
    shutil.rmtree(work / "sh")
    shutil.copytree(data["sh1b"], work / "sh")  # other images under the recorded path
    line = refused("eval", "--run", "../work/R", "--backend", "torch", "--num-workers", "0", "--device", "cpu", code=2)
    assert f"--shards {work / 'sh'}: manifest sha256" in line and "the shards changed since the run read them" in line


def test_an_index_changed_after_sharding_is_refused_naming_it(data, tmp_path):
    shards = Path(shutil.copytree(data["sh1"], tmp_path / "sh"))
    rows = np.load(shards / "val.index.npy")
    rows["label"] = rows["label"][::-1].copy()  # a valid index, other labels
    np.save(shards / "val.index.npy", rows)
    line = refused("train", *TR, "--num-workers", "0", "--shards", shards, "--out", tmp_path / "R", code=1)
    assert f"{shards / 'val.index.npy'}: sha256 differs from the one in the manifest" in line
    assert not (tmp_path / "R" / "config.json").exists()


def test_report_refuses_runs_of_different_datasets_and_a_learnable_tree_of_another_dataset(data, tmp_path):
    runs = {}
    for name in ("sh1", "sh3"):
        runs[name] = tmp_path / f"run-{name}"
        cli("train", *TR, "--num-workers", "0", "--shards", data[name], "--out", runs[name])
    line = refused("report", runs["sh1"], runs["sh3"], "--out", tmp_path / "rep", code=1)
    assert f"runs {runs['sh1']} and {runs['sh3']} were trained on different datasets" in line
    assert not (tmp_path / "rep" / "report.md").exists()
    for tree, why in (("tree-sh1b", "differs from sample"), ("tree-sh3", "3 classes vs the shards' 4")):
        line = refused("report", runs["sh1"], "--out", tmp_path / "rep", "--learnable", data[tree], code=1)
        assert f"--learnable {data[tree] / 'learnable.json'} does not describe the dataset" in line and why in line
    cli("report", runs["sh1"], "--out", tmp_path / "rep", "--learnable", data["tree-sh1"])
    assert (tmp_path / "rep" / "report.md").is_file()


def test_an_empty_validation_split_is_refused_by_train_and_eval(data, tmp_path):
    from pipeline.sources.synthetic import make_imagenet_tree

    make_imagenet_tree(tmp_path / "one", WNIDS, train_per_class=1, val_layout=None, size=(32, 32))
    out = cli("shard", "--imagefolder", tmp_path / "one", "--out", tmp_path / "sh", "--val-share", "0.5",
              "--workers", "1")
    assert "val 0 samples" in out
    line = refused("train", *TR, "--num-workers", "1", "--shards", tmp_path / "sh", "--out", tmp_path / "R", code=1)
    assert f"{tmp_path / 'sh'}: the val split has 0 samples, so no accuracy can be measured" in line
    assert not (tmp_path / "R" / "config.json").exists()
    line = refused("eval", "--checkpoint", data["t1"], "--shards", tmp_path / "sh", "--backend", "torch",
                   "--num-workers", "0", "--device", "cpu", code=1)
    assert "the val split has 0 samples" in line


# ------------------------------------------------------------------------------------ every output claimed

def test_train_refuses_a_user_directory_and_changes_nothing_in_it(data, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.json").write_text('{"mine": true}\n')
    (proj / "skipped.tsv").write_text("my notes\n")
    before = snapshot(proj)
    for extra in ([], ["--resume"]):
        line = refused("train", *TR, "--num-workers", "1", "--shards", data["sh1"], "--out", proj, *extra, code=1)
        assert f"--out {proj} holds files kdpipe did not write (config.json, skipped.tsv)" in line
        assert snapshot(proj) == before and sorted(p.name for p in proj.iterdir()) == ["config.json", "skipped.tsv"]


def test_synth_refuses_a_tree_it_did_not_write_and_reruns_its_own(tmp_path):
    mine = tmp_path / "photos"
    (mine / "train" / WNIDS[0]).mkdir(parents=True)
    (mine / "train" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG").write_bytes(b"my photo")
    before = snapshot(mine)
    args = ["--num-classes", "2", "--train-per-class", "1", "--val-per-class", "1", "--size", "24", "24"]
    line = refused("synth", "--out", mine, *args, code=1)
    assert f"--out {mine} holds files kdpipe did not write (train)" in line and snapshot(mine) == before
    tree = tmp_path / "tree"
    cli("synth", "--out", tree, *args)
    first = snapshot(tree)
    cli("synth", "--out", tree, *args)  # the same settings: the same bytes again
    assert snapshot(tree) == first
    line = refused("synth", "--out", tree, *args[:-2], "32", "32", code=1)
    assert "holds a synthetic tree made with other settings (size: [24, 24] -> [32, 32])" in line
    assert snapshot(tree) == first


def test_report_and_export_refuse_directories_they_did_not_make(data, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "report.txt").write_text("mine\n")
    before = snapshot(proj)
    run = data["t1"].parent
    line = refused("report", run, "--out", proj, code=1)
    assert f"--out {proj} holds files kdpipe did not write (report.txt)" in line
    line = refused("export", "--run", run, "--out", proj, code=1)
    assert f"--out {proj} holds files kdpipe did not write (report.txt)" in line
    line = refused("report", run, "--out", data["t2"].parent, code=1)  # another job's output
    assert f"--out {data['t2'].parent} is a `kdpipe train` run" in line
    assert snapshot(proj) == before


def test_an_out_inside_the_input_tree_is_refused_up_front(data, tmp_path):
    tree = Path(shutil.copytree(data["tree-sh1"], tmp_path / "tree"))
    before = snapshot(tree)
    line = refused("shard", "--imagefolder", tree, "--out", tree / "train" / "shards", "--workers", "1", code=2)
    assert f"--out {tree / 'train' / 'shards'} lies inside --imagefolder {tree}" in line
    assert snapshot(tree) == before
    shards = Path(shutil.copytree(data["sh1"], tmp_path / "sh"))
    line = refused("train", *TR, "--num-workers", "0", "--shards", shards, "--out", shards / "run", code=2)
    assert f"lies inside --shards {shards}" in line and not (shards / "run").exists()


def test_a_resumed_run_rebuilds_the_best_checkpoint_a_full_disk_lost(data, tmp_path, monkeypatch):
    import trainer.engine.checkpoint as ck

    save = ck.atomic_torch_save

    def full_at_best(obj, path):
        if Path(path).name == ck.BEST:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        save(obj, path)

    monkeypatch.setattr(ck, "atomic_torch_save", full_at_best)
    line = refused("train", *TR, "--num-workers", "1", "--shards", data["sh1"], "--out", tmp_path / "R", code=1)
    assert f"no space left on the device writing {tmp_path / 'R' / ck.BEST}" in line
    monkeypatch.setattr(ck, "atomic_torch_save", save)
    copy = Path(shutil.copytree(tmp_path / "R", tmp_path / "copy"))  # moved to a disk with room
    assert "done:" in cli("train", "--out", copy, "--resume", "--num-workers", "1")
    assert (copy / ck.BEST).is_file() and (copy / "student0-tiny_cnn.safetensors").is_file()
    evals = [cli("eval", "--run", copy, "--which", w, "--backend", "torch", "--num-workers", "0", "--device", "cpu")
             for w in ("best", "last")]
    assert evals[0].splitlines()[1:] == evals[1].splitlines()[1:]
    weights = cli("eval", "--checkpoint", copy / "student0-tiny_cnn.safetensors", "--backend", "torch",
                  "--num-workers", "0", "--device", "cpu")  # final weights, as the help says
    assert weights.splitlines()[1:] == evals[1].splitlines()[1:]
    loose = tmp_path / "loose"  # copied out of the run: the files say which view size they learned
    loose.mkdir()
    for suffix in (".safetensors", ".pt"):
        shutil.copy(copy / f"student0-tiny_cnn{suffix}", loose / f"w{suffix}")
        out = cli("eval", "--checkpoint", loose / f"w{suffix}", "--shards", data["sh1"], "--backend", "torch",
                  "--num-workers", "0", "--device", "cpu")
        assert out.splitlines()[1:] == evals[1].splitlines()[1:], suffix
        from trainer.engine.evaluate import load_students

        view = load_students(loose / f"w{suffix}")[2]
        saved = json.loads((copy / "config.json").read_text())
        assert (view["image_size"], view["val_resize"]) == (saved["image_size"], saved["val_resize"]), suffix
    old = ck.load_torch_file(loose / "w.pt")
    ck.save_final_weights(loose / "old", 0, "tiny_cnn", old["model"], old["classes"])  # as an older kdpipe: no view
    line = refused("eval", "--checkpoint", loose / "old" / "student0-tiny_cnn.safetensors", "--shards", data["sh1"],
                   "--device", "cpu", code=2)
    assert "does not record the image size it was trained at; pass --image-size N" in line
