"""The cache-teacher job end to end on tiny synthetic shards: views, losses, refusals, kill -9, 2 ranks, top-k."""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache.store import CacheMismatchError, IncompleteCacheError, TeacherCache
from pipeline.cache.store import validate_cache_for_training
from trainer.jobs.cache_teacher import CacheTeacherConfig, cache_teacher

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]
ARRAYS = ("logits", "weight", "entropy", "done")


def make_shards(root: Path, per_class: int = 10, seed: int = 0, wnids: list[str] = WNIDS) -> Path:
    from conftest import build_tiny_shards

    return build_tiny_shards(root, wnids, train_per_class=per_class, val_per_class=1, size=(40, 56), seed=seed)


def save_teacher(path: Path, seed: int = 0) -> Path:
    from trainer.engine.models import build_model

    torch.manual_seed(seed)
    model = build_model("tiny_resnet", len(WNIDS))
    for m in model.modules():  # non-trivial BN statistics, so eval-mode logits vary across samples
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    with torch.no_grad():  # a confident teacher: logits spread over several units, w well inside (0, 1)
        model.fc.weight.mul_(40.0)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cache_teacher")
    shards = make_shards(root)
    weights = save_teacher(root / "teacher.pt")
    cfg = CacheTeacherConfig(shards=str(shards), out=str(root / "ref.zarr"), teacher_weights=str(weights),
                             teacher="tiny_resnet", epochs=2, seed=5, image_size=32, batch_size=8, chunk_n=16,
                             num_workers=1, device="cpu", progress=False)
    cache_teacher(cfg)  # the uninterrupted single-process reference
    return {"root": root, "shards": shards, "weights": weights, "cfg": cfg}


def variant(data: dict, tmp_path: Path, name: str, **changes) -> CacheTeacherConfig:
    return dataclasses.replace(data["cfg"], out=str(tmp_path / name), **changes)


def assert_same_store(a: str | Path, b: str | Path, names=ARRAYS) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert dict(ga.attrs) == dict(gb.attrs)
    for name in names:
        np.testing.assert_array_equal(ga[name][:], gb[name][:], err_msg=name)


def loader_for(data: dict, *, seed: int = 5, image_size: int = 32, shards=None, cache=None, batch_size: int = 8,
               backend: str = "auto"):
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader

    spec = AugSpec(image_size=image_size)
    return ImageNet100Loader(str(shards or data["shards"]), "train", batch_size, seed=seed, backend=backend,
                             device="cpu", spec=spec, num_workers=1, normalize=True, teacher_cache=cache), spec


def online_teacher(data: dict):
    from trainer.engine.runtime import load_teacher

    return load_teacher("tiny_resnet", data["weights"], WNIDS, torch.device("cpu"))


def test_cached_logits_are_the_teachers_on_the_training_views(data):
    """Every loader batch (training epochs past E too) carries the teacher's logits of exactly its images."""
    from trainer.engine.losses import entropy_weight

    teacher = online_teacher(data)
    loader, _ = loader_for(data, cache=data["cfg"].out)
    seen = 0
    for epoch in (0, 1, 3):  # epoch 3 reuses augmentation epoch 1, images and logits alike
        loader.set_epoch(epoch)
        for batch in loader:
            with torch.no_grad():
                z = teacher(batch.images).float()
            assert batch.teacher_logits is not None and batch.teacher_logits.dtype == torch.float32
            torch.testing.assert_close(batch.teacher_logits, z, atol=2e-2, rtol=2e-3)  # float16 storage
            torch.testing.assert_close(batch.teacher_weight, entropy_weight(z), atol=1e-5, rtol=1e-4)
            seen += len(batch)
    assert seen == 3 * 40


def test_training_steps_with_the_cache_match_the_online_teacher(data):
    """The same students trained on the same batches, with cached or online teacher logits: every loss term
    of every step agrees within float16 tolerance (a wrong view, id, epoch or weight would be far off)."""
    import copy

    from trainer.config import make_config
    from trainer.engine.step import Distiller
    from trainer.engine.models import build_model

    # lr 0.01: five steps of lr 0.1 on tiny models amplify any 1e-3 perturbation chaotically
    cfg = make_config("dual", ("tiny_resnet", "tiny_mobilenet"), optim={"lr": 0.01}, shards=str(data["shards"]),
                      epochs=1, batch_size=8, image_size=32, seed=5, device="cpu", amp="fp32")
    torch.manual_seed(0)
    students = [build_model(n, len(WNIDS)) for n in cfg.students]
    cpu = torch.device("cpu")
    online = Distiller(cfg, copy.deepcopy(students), teacher=online_teacher(data), device=cpu, steps_per_epoch=5)
    cached = Distiller(cfg, copy.deepcopy(students), teacher=None, device=cpu, steps_per_epoch=5)
    loader, _ = loader_for(data, cache=data["cfg"].out)
    loader.set_epoch(6)  # augmentation epoch 0 again
    steps = 0
    for batch in loader:
        torch.manual_seed(steps)  # the same dropout masks in both (the trainer seeds every step too)
        a = online.summarize(online.step(batch.images, batch.labels))["students"]
        torch.manual_seed(steps)
        b = cached.summarize(cached.step(batch.images, batch.labels, batch.teacher_logits,
                                         batch.teacher_weight))["students"]
        for s in (0, 1):
            assert a[s]["teacher"] > 0.01 and 0.05 < a[s]["w"] < 0.95, a[s]  # a confident, varied teacher
            for term in ("loss", "hard", "teacher", "peer", "w"):
                assert b[s][term] == pytest.approx(a[s][term], rel=3e-3, abs=1e-4), (steps, s, term)
        steps += 1
    assert steps == 5


@pytest.mark.parametrize("change,fields", [
    ({"seed": 6}, ["seed"]),
    ({"image_size": 48}, ["aug_spec", "aug_fingerprint", "image_size"]),
])
def test_the_trainer_refuses_a_cache_for_other_views(data, change, fields):
    loader, spec = loader_for(data, **change)
    with pytest.raises(CacheMismatchError) as err:
        validate_cache_for_training(data["cfg"].out, loader=loader, spec=spec, seed=change.get("seed", 5),
                                    image_size=spec.image_size)
    assert err.value.fields == fields
    for f in fields:
        assert f"{f}: cache has" in str(err.value) or f"{f}." in str(err.value)
    if "image_size" in fields:
        assert "aug_spec.image_size: cache has 32, expected 48" in str(err.value)


def test_the_trainer_refuses_a_cache_for_other_shards(data, tmp_path):
    other = make_shards(tmp_path, seed=1)  # same classes and count, other images: another manifest
    loader, spec = loader_for(data, shards=other)
    with pytest.raises(CacheMismatchError, match="manifest_sha256: cache has") as err:
        validate_cache_for_training(data["cfg"].out, loader=loader, spec=spec, seed=5, image_size=32)
    assert err.value.fields == ["manifest_sha256"]
    classes = make_shards(tmp_path / "classes", per_class=8, wnids=WNIDS[:3] + ["n01558993"])  # 40 -> 32 ids too
    loader, spec = loader_for(data, shards=classes)
    wnids_line = r'wnids: cache has \["n01749939", "n02107142".*expected \["n01558993"'
    with pytest.raises(CacheMismatchError, match=wnids_line) as err:
        validate_cache_for_training(data["cfg"].out, loader=loader, spec=spec, seed=5, image_size=32)
    assert err.value.fields == ["manifest_sha256", "wnids"]
    loader, spec = loader_for(data)
    cache = validate_cache_for_training(data["cfg"].out, loader=loader, spec=spec, seed=5, image_size=32)
    assert isinstance(cache, TeacherCache) and cache.epochs == 2


def test_resuming_with_other_teacher_weights_is_refused(data, tmp_path):
    cfg = variant(data, tmp_path, "c.zarr", epochs=1)
    with pytest.raises(ValueError, match="weights do not fit tiny_cnn"):  # wrong weights: no store is left behind
        cache_teacher(dataclasses.replace(cfg, teacher="tiny_cnn"))
    assert not Path(cfg.out).exists()
    cache_teacher(cfg)
    other = save_teacher(tmp_path / "other.pt", seed=1)
    with pytest.raises(CacheMismatchError, match="weights_sha256: cache has"):
        cache_teacher(dataclasses.replace(cfg, teacher_weights=str(other)))
    with pytest.raises(CacheMismatchError, match="epochs: cache has 1, expected 2"):
        cache_teacher(dataclasses.replace(cfg, epochs=2))


class Crash(Exception):
    pass


def test_interrupted_cache_is_refused_then_resumed_to_equal_the_reference(data, tmp_path):
    cfg = variant(data, tmp_path, "c.zarr")
    done = []

    def crash_after_four(epoch, chunk):
        done.append((epoch, chunk))
        if len(done) == 4:
            raise Crash

    with pytest.raises(Crash):
        cache_teacher(cfg, on_unit=crash_after_four)
    loader, spec = loader_for(data)
    with pytest.raises(IncompleteCacheError, match=r"epoch 1 \(2/3 chunks missing\)") as err:
        validate_cache_for_training(cfg.out, loader=loader, spec=spec, seed=5, image_size=32)
    assert err.value.missing_epochs == [1]
    # a unit whose data was half-written before the crash (no marker) holds garbage until recomputed
    zarr.open_group(cfg.out, mode="r+")["logits"][1, 32:40] = np.full((8, 4), 7.0, np.float16)
    rerun = []
    cache_teacher(cfg, on_unit=lambda e, c: rerun.append((e, c)))
    assert rerun == [(1, 1), (1, 2)]  # only what was missing
    assert_same_store(cfg.out, data["cfg"].out)


CHILD = textwrap.dedent("""
    import dataclasses, json, sys
    from trainer.jobs.cache_teacher import CacheTeacherConfig, cache_teacher
    cfg = CacheTeacherConfig(**json.loads(sys.argv[1]))
    def report(epoch, chunk):
        print(epoch, chunk, flush=True)
        if sys.argv[2] == "block":
            sys.stdin.readline()  # wait here until killed
    cache_teacher(cfg, on_unit=report)
""")


def test_kill_9_mid_run_resumes_and_equals_an_uninterrupted_run(data, tmp_path):
    import json

    cfg = variant(data, tmp_path, "c.zarr")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(dataclasses.asdict(cfg)), "block"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first.split() == ["0", "0"], first
        with pytest.raises(RuntimeError, match="another `kdpipe cache-teacher` is writing"):
            cache_teacher(cfg)  # while the child runs, a second job on the same store is refused
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close(), proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL
    assert TeacherCache(cfg.out).missing() == {0: 2, 1: 3}
    cache_teacher(cfg)
    assert_same_store(cfg.out, data["cfg"].out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cfg: CacheTeacherConfig, world: int = 2) -> list[list[tuple[int, int]]]:
    """Run the job as `world` gloo processes (torchrun's environment); the units each one wrote."""
    import json

    env = {**os.environ, "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(dataclasses.asdict(cfg)), "run"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * world, outs
    return [[tuple(map(int, line.split())) for line in out.splitlines()] for out in outs]


@pytest.mark.slow
def test_two_gloo_ranks_write_the_same_store_as_one(data, tmp_path):
    cfg = variant(data, tmp_path, "c.zarr")
    units = run_ranks(cfg)
    assert units == [[(0, 0), (0, 2), (1, 1)], [(0, 1), (1, 0), (1, 2)]]  # chunk-aligned units r, r+2, ...
    assert_same_store(cfg.out, data["cfg"].out)
    # resuming a store one process left half done: the pending units are dealt out evenly
    resumed = variant(data, tmp_path, "r.zarr")
    def crash_after_second_unit(epoch: int, chunk: int) -> None:
        if (epoch, chunk) == (0, 1):
            raise Crash

    with pytest.raises(Crash):
        cache_teacher(resumed, on_unit=crash_after_second_unit)
    assert run_ranks(resumed) == [[(0, 2), (1, 1)], [(1, 0), (1, 2)]]
    assert_same_store(resumed.out, data["cfg"].out)


def test_topk_store_round_trips_against_full_logits(data, tmp_path):
    cfg = variant(data, tmp_path, "k.zarr", topk=2, epochs=1)
    cache_teacher(cfg)
    g = zarr.open_group(cfg.out, mode="r")
    assert g.attrs["topk"] == 2 and g.attrs["fingerprint"]["topk"] == 2 and "logits" not in g
    full, top = TeacherCache(data["cfg"].out), TeacherCache(cfg.out)
    ids = np.arange(40)
    z, w = full.lookup(0, ids)
    logp, wk = top.lookup(0, ids)
    np.testing.assert_array_equal(w, wk)  # weight from the full logits either way
    exact = torch.log_softmax(torch.from_numpy(z), 1).numpy()
    order = np.argsort(-exact, 1)
    kept = np.take_along_axis(logp, order[:, :2], 1)
    np.testing.assert_allclose(kept, np.take_along_axis(exact, order[:, :2], 1), atol=2e-2)
    np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, atol=1e-2)
    tail = np.take_along_axis(logp, order[:, 2:], 1)
    np.testing.assert_allclose(tail, tail[:, :1].repeat(2, 1), rtol=1e-6)


def test_cli_cache_teacher_writes_then_refuses_other_options(data, tmp_path):
    from click.testing import CliRunner

    from trainer.cli import main

    def args(seed: int, batch: int = 8) -> list[str]:
        return ["cache-teacher", "--shards", str(data["shards"]), "--teacher", "tiny_resnet", "--teacher-weights",
                str(data["weights"]), "--out", str(tmp_path / "c.zarr"), "--epochs", "1", "--seed", str(seed),
                "--image-size", "32", "--batch-size", str(batch), "--chunk", "16", "--num-workers", "1",
                "--device", "cpu"]

    result = CliRunner().invoke(main, args(5))
    assert result.exit_code == 0, result.output
    assert "teacher cache complete" in result.output
    ref = zarr.open_group(data["cfg"].out, mode="r")
    np.testing.assert_array_equal(zarr.open_group(str(tmp_path / "c.zarr"), mode="r")["logits"][0], ref["logits"][0])
    result = CliRunner().invoke(main, args(6))
    assert result.exit_code == 1 and "seed: cache has 5, expected 6" in result.output
    result = CliRunner().invoke(main, args(5, batch=6))
    assert result.exit_code == 2 and "must be a multiple of --batch-size (6)" in result.output


def test_config_refuses_batches_that_would_straddle_units(data):
    with pytest.raises(ValueError, match=r"--chunk \(16\) must be a multiple of --batch-size \(6\)"):
        dataclasses.replace(data["cfg"], batch_size=6)


@pytest.mark.dali
def test_dali_views_cache_matches_dali_training_batches(data, tmp_path):
    """The same contract through the DALI backend (CPU-only mode here), and its backend is recorded."""
    cfg = variant(data, tmp_path, "d.zarr", backend="dali", epochs=1)
    cache_teacher(cfg)
    assert zarr.open_group(cfg.out, mode="r").attrs["fingerprint"]["backend"] == "dali"
    teacher = online_teacher(data)
    loader, _ = loader_for(data, cache=cfg.out, backend="dali")
    loader.set_epoch(2)
    for batch in loader:
        with torch.no_grad():
            z = teacher(batch.images).float()
        torch.testing.assert_close(batch.teacher_logits, z, atol=2e-2, rtol=2e-3)
    torch_loader, spec = loader_for(data, backend="torch")
    with pytest.warns(UserWarning, match="made with the dali backend, training uses torch"):
        validate_cache_for_training(cfg.out, loader=torch_loader, spec=spec, seed=5, image_size=32)


@pytest.mark.gpu
def test_cuda_cache_matches_the_bf16_teacher_on_cuda_batches(data, tmp_path):
    """On a GPU: views decoded on the device, teacher under bf16 autocast (the trainer's default), same batches."""
    from trainer.engine.runtime import autocast, load_teacher

    cfg = variant(data, tmp_path, "g.zarr", device="cuda", epochs=1)
    cache_teacher(cfg)
    fp = zarr.open_group(cfg.out, mode="r").attrs["fingerprint"]
    assert fp["precision"] == "bf16"
    cuda = torch.device("cuda")
    teacher = load_teacher("tiny_resnet", data["weights"], WNIDS, cuda)
    from pipeline.core.augment import AugSpec
    from pipeline.reader.loader import ImageNet100Loader

    loader = ImageNet100Loader(str(data["shards"]), "train", 8, seed=5, device=cuda, spec=AugSpec(image_size=32),
                               teacher_cache=cfg.out)
    assert loader.backend_name == fp["backend"]
    for batch in loader:
        assert batch.teacher_logits.device.type == "cuda"
        with torch.no_grad(), autocast(cuda, torch.bfloat16):
            z = teacher(batch.images).float()
        torch.testing.assert_close(batch.teacher_logits, z, atol=5e-2, rtol=2e-2)  # bf16 forward, float16 store


def test_a_second_job_on_the_same_store_is_refused(data, tmp_path):
    from trainer.jobs.cache_teacher import job_lock

    cfg = variant(data, tmp_path, "c.zarr", epochs=1)
    lock_file = tmp_path / ".c.zarr.lock"
    with job_lock(cfg.out):  # as if another job were running
        with pytest.raises(RuntimeError, match="another `kdpipe cache-teacher` is writing"):
            cache_teacher(cfg)
    assert not lock_file.exists()  # nothing left beside the store
    cache_teacher(cfg)  # free again once it ends
    assert TeacherCache(cfg.out).missing() == {}
    # a job refused because the store was made for other options leaves no lock file behind either
    with pytest.raises(CacheMismatchError):
        cache_teacher(dataclasses.replace(cfg, seed=6))
    assert not lock_file.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr"]


@pytest.mark.parametrize("spoil,said", [
    ("scale", "beyond the 65504 of the float16 the cache stores"),
    ("nan", "logits are not finite (nan or inf)"),
    ("zero_head", "the same logit for every class"),
])
def test_cli_refuses_a_diverged_teacher_before_any_store(data, tmp_path, spoil, said):
    """A teacher whose logits overflow float16, are NaN or ignore the image is named in one line (the weights
    file, what to do) before anything is cached: no store, no lock file left behind."""
    from click.testing import CliRunner

    from trainer.cli import main

    state = torch.load(data["weights"], weights_only=True)
    if spoil == "scale":  # what a few steps at too high a learning rate gave: logits of 1e6 and more
        state["fc.weight"] = state["fc.weight"] * 1e6
    elif spoil == "nan":
        state = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    else:
        state["fc.weight"], state["fc.bias"] = state["fc.weight"] * 0, state["fc.bias"] * 0
    weights = tmp_path / f"{spoil}.pt"
    torch.save(state, weights)
    out = tmp_path / "c.zarr"
    result = CliRunner().invoke(main, ["cache-teacher", "--shards", str(data["shards"]), "--teacher", "tiny_resnet",
                                       "--teacher-weights", str(weights), "--out", str(out), "--epochs", "1",
                                       "--image-size", "32", "--batch-size", "8", "--chunk", "16",
                                       "--num-workers", "1", "--device", "cpu"])
    assert result.exit_code in (1, 2), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert f"--teacher-weights {weights}: " in lines[0] and said in lines[0]
    assert "Retrain it" in lines[0] and "nothing was cached" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == [weights]


def test_teacher_logits_problem_names_each_kind():
    from trainer.jobs.cache_teacher import teacher_logits_problem

    z = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    assert teacher_logits_problem(z, full_logits=True) is None
    assert teacher_logits_problem(z * 1e5, full_logits=False) is None  # top-k stores log-probabilities
    assert "beyond the 65504" in teacher_logits_problem(z * 1e5, full_logits=True)
    assert "1 of 20 logits are not finite" in teacher_logits_problem(np.where(z == z[1, 2], np.inf, z), True)
    assert "does not depend on the image" in teacher_logits_problem(np.tile(z[:1], (4, 1)), True)
    assert teacher_logits_problem(z[:1], True) is None  # one image: nothing to compare with


def test_writer_error_reaches_the_caller_as_one_kdpipe_line(data, tmp_path, monkeypatch):
    """The writer thread's refusal (past the first-batch check, e.g. a later unit overflowing float16) is a
    KdpipeError naming the store and the unit, re-raised in the main thread."""
    from pipeline.core.errors import KdpipeError, TeacherLogitsError
    from trainer.jobs import cache_teacher as job

    monkeypatch.setattr(job, "check_teacher_logits", lambda *a, **k: None)
    state = torch.load(data["weights"], weights_only=True)
    state["fc.weight"] = state["fc.weight"] * 1e6
    torch.save(state, tmp_path / "big.pt")
    cfg = variant(data, tmp_path, "c.zarr", teacher_weights=str(tmp_path / "big.pt"), epochs=1)
    with pytest.raises(TeacherLogitsError) as err:
        cache_teacher(cfg)
    assert isinstance(err.value, KdpipeError) and "\n" not in str(err.value)
    assert f"(unit: epoch 0, chunk 0) of teacher cache {cfg.out} exceed float16's range" in str(err.value)
