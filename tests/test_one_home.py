"""Issue 19 item 2: one home per concept. Each test pins the single definition and that its callers use it:
device and precision (pipeline.core.device), collectives (trainer.engine.runtime), rebuilding a model
(trainer.engine.models.rebuild_model), and `kdpipe eval` computing in the run's own --amp."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core import device as core_device
from pipeline.core.errors import CheckpointError, ConfigError

from clitools import cli

ROOT = Path(__file__).resolve().parent.parent


def sources(*packages: str) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for pkg in packages for p in (ROOT / pkg).rglob("*.py")}


# ------------------------------------------------------------------------------------ device and precision

def test_device_choice_names_the_flag_or_argument(monkeypatch):
    assert core_device.resolve_device("cpu") == torch.device("cpu")
    assert core_device.resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match=r"--device 'gpu0' is not a device"):
        core_device.resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert core_device.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda asked for, but CUDA is not available here; use --device cpu"):
        core_device.resolve_device("cuda")
    with pytest.raises(ConfigError, match="device='cuda:1' asked for, .* use device='cpu'"):
        core_device.resolve_device("cuda:1", flag="device")


def test_the_loader_takes_device_and_dtype_from_the_one_home(monkeypatch, tmp_path):
    from pipeline.reader.loader import ImageNet100Loader

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda' asked for"):  # before any file is read
        ImageNet100Loader(tmp_path / "none", device="cuda")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        ImageNet100Loader(tmp_path / "none", device="cpu", dtype=torch.int32)


def test_precision_has_one_home():
    from trainer import config
    from trainer.engine import runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert core_device.precision_dtype("auto", cpu) == torch.float32
    assert core_device.precision_dtype("auto", cuda) == torch.bfloat16
    assert [core_device.precision_dtype(p, cpu) for p in ("bf16", "fp16", "fp32")] == \
        [torch.bfloat16, torch.float16, torch.float32]
    assert [core_device.precision_name(d) for d in (torch.bfloat16, torch.float16, torch.float32)] == \
        ["bf16", "fp16", "fp32"]
    with pytest.raises(ConfigError, match="--amp must be one of auto, bf16, fp16, fp32, got 'fp8'"):
        core_device.precision_dtype("fp8", cpu, flag="--amp")
    assert config.Precision is core_device.Precision and runtime.PRECISIONS is core_device.PRECISIONS
    assert runtime.precision_dtype is core_device.precision_dtype and runtime.resolve_device is \
        core_device.resolve_device
    assert core_device.check_dtype(None) == torch.float32


# ------------------------------------------------------------------------------------ collectives

def test_collectives_live_in_runtime_and_are_no_ops_without_a_group():
    from trainer.engine.runtime import all_gather_list, all_reduce_sum_, broadcast_from_rank0_, dist_info

    t = torch.tensor([1.0, 2.0])
    all_reduce_sum_(t)
    broadcast_from_rank0_(t)
    assert dist_info() == (0, 1) and t.tolist() == [1.0, 2.0] and all_gather_list([(1, "x")]) == [(1, "x")]
    users = {f for f, text in sources("trainer").items()
             if any(call in text for call in ("all_gather_object", "all_reduce(", "broadcast("))}
    assert users == {"trainer/engine/runtime.py"}, users


# ------------------------------------------------------------------------------------ rebuilding a model

def test_rebuild_model_is_the_one_way_back_from_files(tmp_path):
    from trainer.engine.models import build_model, rebuild_model

    model = build_model("tiny_cnn", 3)
    back = rebuild_model("tiny_cnn", 3, model.state_dict(), path=tmp_path / "f.pt")
    assert not back.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    with pytest.raises(CheckpointError, match=r"f\.pt: weights do not fit tiny_cnn: 2 tensors differ in shape"):
        rebuild_model("tiny_cnn", 5, model.state_dict(), path=tmp_path / "f.pt")
    with pytest.raises(CheckpointError, match="1 unexpected keys"):
        rebuild_model("tiny_cnn", 3, model.state_dict() | {"extra": torch.zeros(1)}, path=tmp_path / "f.pt")
    texts = sources("trainer/engine/evaluate.py", "trainer/jobs/export.py")
    assert not any("load_state_dict" in t or "build_model(" in t for t in texts.values())


# ------------------------------------------------------------------------------------ eval honours --amp

@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Path:
    from pipeline.shards.writer import ShardOptions, build_shards
    from pipeline.sources.learnable import make_learnable_tree

    root = tmp_path_factory.mktemp("amp")
    wnids = ["n02869837", "n01749939"]
    make_learnable_tree(root / "tree", wnids, train_per_class=4, val_per_class=2, size=24, seed=0)
    build_shards(root / "tree", root / "sh", classes=wnids, options=ShardOptions(shard_size=8), workers=1,
                 progress=False)
    cli("train", "--shards", root / "sh", "--out", root / "run", "--mode", "hard", "--students", "tiny_cnn",
        "--epochs", "1", "--image-size", "24", "--batch-size", "4", "--backend", "torch", "--device", "cpu",
        "--num-workers", "0", "--amp", "bf16")
    return root / "run"


def test_eval_computes_in_the_runs_own_amp_unless_told(bf16_run, monkeypatch):
    from trainer.engine import evaluate as ev

    seen = []

    def fake(models, loader, device, *, amp_dtype=None, channels_last=True):
        seen.append(amp_dtype)
        return {"top1": [0.0], "top5": [0.0], "ensemble_top1": 0.0, "ensemble_top5": 0.0, "count": 4}

    monkeypatch.setattr(ev, "evaluate", fake)
    common = ["--backend", "torch", "--num-workers", "0", "--device", "cpu"]
    cli("eval", "--run", bf16_run, *common)
    cli("eval", "--run", bf16_run, "--amp", "fp32", *common)
    assert seen == [torch.bfloat16, torch.float32]  # auto on the CPU would be fp32: the run's bf16 is honoured


# ------------------------------------------------------------------------------------ sha256, crc, entropy

def test_one_sha256_of_bytes_and_files(tmp_path):
    import hashlib

    from pipeline.core.digest import bytes_sha256, file_sha256

    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert bytes_sha256(data) == file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    # what is left hashes incrementally (tar members as they are written, file lists) or wants raw digests
    users = {f for f, text in sources("pipeline", "trainer").items() if "hashlib.sha256(" in text}
    assert users == {"pipeline/core/digest.py", "pipeline/shards/tar_io.py", "pipeline/sources/imagenet.py",
                     "pipeline/sources/imagefolder.py"}, users


def test_one_jpeg_crc_check():
    import zlib

    from pipeline.reader.index import jpeg_crc_problem

    jpg = b"\xff\xd8 not really a jpeg \xff\xd9"
    assert jpeg_crc_problem(jpg, zlib.crc32(jpg)) == ""
    assert jpeg_crc_problem(jpg, 7) == f".jpg crc32 {zlib.crc32(jpg)} differs from the 7 recorded in the index"
    users = {f for f, text in sources("pipeline/reader").items() if "zlib.crc32(" in text}
    assert users == {"pipeline/reader/index.py"}, users


def test_numpy_and_torch_entropy_and_weight_agree():
    from pipeline.cache.store import entropy_and_weight
    from pipeline.core.entropy import confidence_weight, entropy as np_entropy
    from trainer.engine.losses import entropy as torch_entropy, entropy_weight

    z = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)) * 4
    z[0] = 0.0  # uniform: w = 0
    z[1, 3] = 80.0  # one-hot: w = 1
    for tau in (1.0, 4.0):
        torch.testing.assert_close(torch_entropy(z, tau).double(), torch.from_numpy(np_entropy(z.numpy(), tau)),
                                   atol=2e-6, rtol=1e-5)
    ent, w = entropy_and_weight(z.numpy())
    torch.testing.assert_close(torch.from_numpy(w), entropy_weight(z), atol=2e-6, rtol=1e-5)
    assert abs(w[0]) < 1e-6 and abs(w[1] - 1) < 1e-6
    assert confidence_weight(np_entropy(z.numpy()), 10).dtype == np.float64


# ------------------------------------------------------------------------------------ one atomic JSON writer

def test_one_atomic_json_writer(tmp_path):
    from pipeline.core.atomic import atomic_write_json, json_text

    path = tmp_path / "a" / "f.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n' == json_text({"b": 1, "a": [1, 2]})
    os.utime(path, ns=(1, 1))
    atomic_write_json(path, {"a": [1, 2], "b": 1}, keep_same=True)  # the same bytes: left untouched
    assert path.stat().st_mtime_ns == 1 and not list(path.parent.glob(".*.tmp"))
    atomic_write_json(path, {"a": 3}, indent=2, keep_same=True)
    assert json.loads(path.read_text()) == {"a": 3} and path.stat().st_mtime_ns != 1
    # JSON files are formatted (indent=...) in one place only
    users = {f for f, text in sources("pipeline", "trainer").items() if "json.dumps(" in text and "indent=" in text}
    assert users == {"pipeline/core/atomic.py"}, users


def test_the_learnable_description_goes_through_it(tmp_path):
    from pipeline.core.atomic import json_text
    from pipeline.sources.learnable import DESCRIPTION_FILE, make_learnable_tree

    make_learnable_tree(tmp_path / "t", ["n02869837", "n01749939"], train_per_class=1, val_per_class=1, size=24,
                        seed=0)
    text = (tmp_path / "t" / DESCRIPTION_FILE).read_text()
    assert text == json_text(json.loads(text))


# ------------------------------------------------------------------------------------ one retry helper

def test_one_retry_loop_for_remote_reads(monkeypatch):
    from pipeline.core import remote
    from pipeline.core.errors import MissingDataError, RemoteReadError

    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    calls, retried = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("dropped")
        return b"ok"

    assert remote.with_retries(flaky, 3, RemoteReadError, on_retry=lambda: retried.append(1)) == b"ok"
    assert len(calls) == 3 and len(retried) == 2
    with pytest.raises(RemoteReadError, match="gave up: ConnectionResetError"):
        remote.with_retries(lambda: (_ for _ in ()).throw(ConnectionResetError("x")), 2,
                            lambda e: RemoteReadError(f"gave up: {type(e).__name__}"))
    with pytest.raises(MissingDataError):  # final at once, not retried
        remote.with_retries(lambda: (_ for _ in ()).throw(MissingDataError("gone")), 2, RemoteReadError)
    text = (ROOT / "pipeline/core/remote.py").read_text()
    assert text.count("time.sleep(") == 1 and text.count("while True") == 1


# ------------------------------------------------------------------------------------ run files and the report lock

def test_run_file_names_live_in_rundir_only():
    from trainer.engine.rundir import RunDir

    run = RunDir("runs/a")
    assert (run.config_path.name, run.metrics_path.name, run.last.name, run.best.name, run.lock_path.name) == \
        ("config.json", "metrics.jsonl", "checkpoint-last.pt", "checkpoint-best.pt", ".kdpipe.lock")
    assert run.final_weights(1, "timm:vit/s", ".onnx") == Path("runs/a/student1-timm_vit_s.onnx")
    names = ('"config.json"', '"metrics.jsonl"', '"checkpoint-last.pt"', "'metrics.jsonl'", '".kdpipe.lock"')
    texts = sources("trainer/cli.py", "trainer/jobs/export.py", "trainer/report/build.py", "trainer/jobs/demo.py")
    assert not {f for f, t in texts.items() if any(n in t for n in names)}


def test_the_report_writer_takes_the_directory_lock(tmp_path):
    from pipeline.core.errors import BusyError
    from trainer.engine.rundir import RunDir, directory_lock
    from trainer.report.build import write_report

    out = tmp_path / "report"
    with directory_lock(out):  # another writer (a report, or the demo's report stage) holds OUT
        with pytest.raises(BusyError, match=f"directory {out} is in use"):
            write_report([tmp_path / "run"], out)
        line = cli("report", tmp_path, "--out", out, code=1)
        assert "is in use" in line
    with RunDir(tmp_path / "run").lock():  # a report into a run being trained
        with pytest.raises(BusyError, match="in use"):
            write_report([tmp_path / "run"], tmp_path / "run")
    assert not (out / "report.md").exists() and not (out / ".kdpipe.lock").exists()
    with pytest.raises(FileNotFoundError):  # free again: the writer gets past the lock to the runs
        write_report([tmp_path / "run"], out)


def test_the_demo_writes_its_report_through_the_locking_writer():
    import inspect

    from trainer.jobs import demo

    src = inspect.getsource(demo._run_stages)
    assert "write_report(" in src and "exclusive_lock" not in inspect.getsource(demo)
