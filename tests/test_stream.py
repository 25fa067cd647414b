"""Shards streamed from a URL: the plan (pure), per-id pixel equality with the random-access loader over a local
HTTP server, exact epochs across ranks, resume, dropped connections (resumed, or a clear error), names that
escape the directory, pipe: and file:// sources, a teacher cache made and read through URLs, the CLI."""
from __future__ import annotations

import json
import shutil
import socket
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.augment import AugSpec
from pipeline.core.errors import ConfigError, RemoteReadError, ShardFormatError
from pipeline.reader.loader import ImageNet100Loader
from pipeline.core.remote import RetryingStream, is_url, member_url
from pipeline.reader.stream import buffer_shuffle, needed_segments, stream_plan

WNIDS = ["n02869837", "n01749939", "n02488291", "n02107142"]
SPEC = AugSpec(image_size=32, val_resize=36)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """42 train samples in 6 shards (the last one short), 8 val samples."""
    from pipeline.shards.writer import ShardOptions, build_shards
    from pipeline.sources.synthetic import make_imagenet_tree

    root = tmp_path_factory.mktemp("stream")
    make_imagenet_tree(root / "tree", WNIDS, train_per_class=10, val_per_class=2, size=(40, 48))
    (root / "tree" / "train" / WNIDS[0] / "extra1.JPEG").write_bytes(
        (root / "tree" / "train" / WNIDS[0]).iterdir().__next__().read_bytes())
    (root / "tree" / "train" / WNIDS[1] / "extra2.JPEG").write_bytes(
        (root / "tree" / "train" / WNIDS[1]).iterdir().__next__().read_bytes())
    build_shards(root / "tree", root / "shards", classes=WNIDS, options=ShardOptions(shard_size=8), workers=1,
                 progress=False)
    return root / "shards"


class Handler(SimpleHTTPRequestHandler):
    """Serves the server's root with optional Range support; drops a file's connection after some bytes,
    a set number of times (server.drops[name] = [times, after_bytes]); logs (path, Range) per request."""

    def do_GET(self):
        srv = self.server
        name = self.path.lstrip("/")
        srv.log.append((name, self.headers.get("Range")))
        path = Path(srv.root) / name
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range") and srv.ranges:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        drop = srv.drops.get(name)
        if drop and drop[0] > 0:
            drop[0] -= 1
            self.wfile.write(body[:drop[1]])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(dir, ranges=True) -> (base URL, server) on 127.0.0.1; stopped at the end of the test."""
    servers = []

    def start(root: Path, ranges: bool = True):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.root, srv.ranges, srv.drops, srv.log = str(root), ranges, {}, []
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def loader(shards, split="train", **kw) -> ImageNet100Loader:
    kw = {"backend": "torch", "device": "cpu", "num_workers": 0, "spec": SPEC, "normalize": False, **kw}
    return ImageNet100Loader(str(shards) if not isinstance(shards, str) else shards, split, kw.pop("bs", 8), **kw)


def assert_same_views(stream: ImageNet100Loader, local: ImageNet100Loader, epoch: int) -> list[int]:
    """Every batch of the streamed epoch equals the random-access render of the same ids; returns the ids."""
    stream.set_epoch(epoch)
    seen = []
    for b in stream:
        ref = next(local.iter_views(b.ids.numpy(), epoch, len(b.ids)))
        assert torch.equal(b.images, ref.images) and torch.equal(b.labels, ref.labels)
        seen += b.ids.tolist()
    return seen


# ---------------------------------------------------------------- the plan (pure)

def test_plan_gives_every_id_once_across_ranks_and_pads_train_to_equal_length():
    counts, first = [8, 8, 8, 8, 8, 2], [0, 8, 16, 24, 32, 40]
    for world in (1, 2, 3, 5):
        val = [stream_plan(first, counts, 0, 1, r, world, shuffle=False, pad=False) for r in range(world)]
        assert np.array_equal(np.concatenate([p.order for p in val]), np.arange(42))  # in order, once
        train = [stream_plan(first, counts, 7, 3, r, world, buffer=5) for r in range(world)]
        assert {len(p.order) for p in train} == {-(-42 // world)}
        ids = np.concatenate([p.order for p in train])
        assert set(ids.tolist()) == set(range(42)) and len(ids) - 42 == (-42) % world
        for p in train:  # each rank reads whole shards but at its two ends
            assert sum(hi - lo for _, lo, hi in p.segments) == len(set(p.order.tolist()))
    a, b = stream_plan(first, counts, 7, 3, buffer=5), stream_plan(first, counts, 7, 3, buffer=5)
    assert np.array_equal(a.order, b.order) and a.segments == b.segments  # pure
    c = stream_plan(first, counts, 7, 4, buffer=5)
    assert not np.array_equal(a.order, c.order)  # another epoch: another shard order and shuffle


def test_buffer_shuffle_holds_at_most_its_size():
    ids = np.arange(1000)
    out = buffer_shuffle(ids, 50, np.random.default_rng(0))
    assert sorted(out.tolist()) == ids.tolist() and not np.array_equal(out, ids)
    # emitted at position j means arrived by j + 50: never held longer than the buffer allows
    assert np.all(out[:950] <= np.arange(950) + 50)
    assert np.array_equal(buffer_shuffle(ids, 1, np.random.default_rng(0)), ids)


def test_needed_segments_narrow_to_the_ids_asked():
    shard_of = np.repeat(np.arange(3), 4)  # ids 0-3 in shard 0, 4-7 in 1, 8-11 in 2
    assert needed_segments(shard_of, np.array([9, 2, 3, 10]), None) == [(2, 9, 11), (0, 2, 4)]
    assert needed_segments(shard_of, np.array([5, 6]), [(0, 0, 4), (1, 4, 8)]) == [(1, 5, 7)]


def test_pipe_specs_need_a_slot_and_urls_are_told_from_paths():
    with pytest.raises(ConfigError, match="{name}"):
        member_url("pipe:cat /data/shards", "manifest.json")
    assert member_url("pipe:cat /d/{name}", "a.tar") == "pipe:cat /d/a.tar"
    with pytest.raises(ShardFormatError, match="not a plain file name"):  # never reaches the shell (issue 18)
        member_url("pipe:cat /d/{name}", "a b;c")
    assert member_url("http://h/x/", "a.tar") == "http://h/x/a.tar"
    assert is_url("s3://b/k") and is_url("pipe:cat x") and not is_url("/data/shards") and not is_url(Path("x"))


# ---------------------------------------------------------------- against a local HTTP server

@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_views_equal_random_access_views_per_id(shards, serve, workers):
    url, srv = serve(shards)
    local = loader(shards)
    stream = loader(url, num_workers=workers, drop_last=False, shuffle_buffer=10)
    assert stream.num_samples == local.num_samples == 42 and stream.classes == local.classes
    assert len(stream) == 6
    seen = assert_same_views(stream, local, epoch=2)
    assert sorted(seen) == list(range(42))  # exactly once per epoch
    assert seen != sorted(seen)  # shuffled
    # the manifest and index were fetched once; each shard once, front to back
    names = [n for n, _ in srv.log]
    assert names.count("manifest.json") <= 1 and names.count("train.index.npy") == 1
    assert sorted(n for n in names if n.endswith(".tar")) == [f"train-{k:06d}.tar" for k in range(6)]


def test_val_and_ranks_over_http(shards, serve):
    url, _ = serve(shards)
    val = assert_same_views(loader(url, "val", bs=3), loader(shards, "val"), epoch=0)
    assert val == list(range(8))  # validation: shard order, every sample once
    ranks = [loader(url, rank=r, world_size=3, shuffle_buffer=4) for r in range(3)]
    assert {len(r) for r in ranks} == {42 // 3 // 8}
    got = []
    for r in ranks:
        r.drop_last = False
        got += assert_same_views(r, loader(shards), epoch=5)
    assert sorted(got) == list(range(42))


def test_resume_inside_an_epoch_yields_the_rest_exactly(shards, serve):
    url, _ = serve(shards)
    full = loader(url, shuffle_buffer=6)
    full.set_epoch(3)
    batches = [(b.ids.tolist(), b.images) for b in full]
    resumed = loader(url, shuffle_buffer=6)
    resumed.set_epoch(3, start_step=3)
    rest = [(b.ids.tolist(), b.images) for b in resumed]
    assert [i for i, _ in rest] == [i for i, _ in batches[3:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, batches[3:]))


@pytest.mark.parametrize("ranges", [True, False])
@pytest.mark.parametrize("after", [700, 2048])  # mid-member, and on a tar block boundary
def test_a_dropped_connection_is_resumed_at_the_same_byte(shards, serve, ranges, after):
    url, srv = serve(shards, ranges=ranges)
    srv.drops["train-000001.tar"] = [1, after]
    srv.drops["train-000004.tar"] = [2, 3000]
    seen = assert_same_views(loader(url, drop_last=False, shuffle_buffer=10), loader(shards), epoch=0)
    assert sorted(seen) == list(range(42))
    again = [r for n, r in srv.log if n == "train-000001.tar"]
    assert len(again) == 2 and again[1] is not None and again[1].startswith("bytes=")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_connection_that_keeps_dropping_is_an_error_not_a_short_epoch(shards, serve, monkeypatch, workers):
    monkeypatch.setattr("pipeline.core.remote.time.sleep", lambda s: None)
    url, srv = serve(shards, ranges=False)  # every retry starts over and dies at the same byte: no progress
    srv.drops["train-000002.tar"] = [99, 1500]
    stream = loader(url, drop_last=False, num_workers=workers)
    with pytest.raises(RemoteReadError, match=r"train-000002\.tar: read failed at byte 1500 .* after 3 retries"):
        for _ in stream:
            pass


def test_retrying_stream_on_a_file_url_is_exact(shards):
    path = shards / "train-000000.tar"
    with RetryingStream(path.as_uri(), path.stat().st_size, start=512) as f:
        assert f.read() == path.read_bytes()[512:] and f.read() == b""


def test_a_manifest_name_that_escapes_is_refused(shards, serve, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["splits"]["train"]["shards"][1]["name"] = "../../etc/hostname"
    (bad / "manifest.json").write_text(json.dumps(m))
    url, _ = serve(bad)
    with pytest.raises(ShardFormatError, match=r"'\.\./\.\./etc/hostname' is not a plain file name"):
        loader(url)


def test_pipe_and_file_sources_give_the_same_samples(shards):
    local = loader(shards)
    for src in (f"pipe:cat {shards}/{{name}}", shards.as_uri()):
        assert assert_same_views(loader(src, "val"), loader(shards, "val"), epoch=0) == list(range(8))
        assert len(assert_same_views(loader(src, shuffle_buffer=3), local, epoch=1)) == 40


def test_loader_rejects_backends_that_cannot_stream(shards, serve):
    url, _ = serve(shards)
    with pytest.raises(ConfigError, match="torch"):
        loader(url, backend="dali")
    with pytest.raises(ConfigError, match="shuffle_buffer"):
        loader(shards, shuffle_buffer=10)


# ---------------------------------------------------------------- teacher cache and CLI through URLs

@pytest.mark.slow
def test_cli_cache_teacher_and_train_from_urls(shards, serve, tmp_path):
    from click.testing import CliRunner

    from pipeline.cache.store import TeacherCache
    from trainer.engine.rundir import RunDir
    from trainer.cli import main
    from trainer.engine.models import build_model

    def cli(*args):
        res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    url, _ = serve(shards)
    torch.save(build_model("tiny_cnn", 4).state_dict(), tmp_path / "t.pt")
    common = ["--image-size", "32", "--backend", "torch", "--num-workers", "0", "--device", "cpu"]
    for name, src in (("local", shards), ("http", url)):
        cli("cache-teacher", "--shards", src, "--teacher", "tiny_cnn", "--teacher-weights", tmp_path / "t.pt",
            "--out", tmp_path / f"{name}.zarr", "--batch-size", "7", "--chunk", "14", "--epochs", "2", *common)
    a, b = TeacherCache(tmp_path / "local.zarr"), TeacherCache((tmp_path / "http.zarr").as_uri())
    assert a.fingerprint == b.fingerprint  # same manifest sha256, same views
    for e in (0, 1):
        ids = np.arange(42)
        assert np.array_equal(a.lookup(e, ids)[0], b.lookup(e, ids)[0])
    cli("train", "--shards", url, "--out", tmp_path / "run", "--mode", "kd", "--students", "tiny_cnn",
        "--teacher-cache", (tmp_path / "local.zarr").as_uri(), "--epochs", "2", "--batch-size", "8", *common)
    recs = [r.to_json() for r in RunDir(tmp_path / "run").read_metrics()]
    assert [r["images"] for r in recs] == [40, 40] and recs[0]["val_images"] == 8
    assert "(8 validation images)" in cli("eval", "--run", tmp_path / "run", "--shards", url)
    cli("report", tmp_path / "run", "--out", tmp_path / "report")  # the run's cache and shards are URLs
    report = (tmp_path / "report" / "report.md").read_text()
    assert f"From the teacher cache `{(tmp_path / 'local.zarr').as_uri()}`" in report
    assert f"are a URL ({url}); the picture reads local shards only" in report


@pytest.mark.slow
def test_unreachable_sources_are_one_line_errors(shards, serve, tmp_path):
    import importlib.util
    import os
    import subprocess
    import sys

    from pipeline.cache.store import TeacherCache

    url, _ = serve(shards)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    res = subprocess.run([sys.executable, "-m", "trainer.cli", "train", "--shards", f"{url}/nothing", "--out",
                          str(tmp_path / "run"), "--mode", "hard", "--device", "cpu"], capture_output=True, text=True,
                         env=env, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and "Traceback" not in res.stderr and len(lines) == 1
    assert f"{url}/nothing/manifest.json: HTTP 404" in lines[0]
    if importlib.util.find_spec("aiohttp") is None:  # zarr reads http(s) through fsspec's aiohttp filesystem
        with pytest.raises(ConfigError, match="aiohttp"):
            TeacherCache(f"{url}/teacher.zarr")


@pytest.mark.slow
def test_interrupted_and_resumed_streamed_run_matches_an_uninterrupted_one(shards, serve, tmp_path):
    from click.testing import CliRunner

    from trainer.cli import main
    from trainer.engine.metrics import TIMING_FIELDS
    from trainer.engine.rundir import RunDir

    def cli(*args):
        res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return res.output

    def metrics(run):
        return [{k: v for k, v in r.to_json().items() if k not in TIMING_FIELDS} for r in RunDir(run).read_metrics()]

    url, _ = serve(shards)
    args = ["--shards", url, "--mode", "hard", "--students", "tiny_cnn", "--epochs", "2", "--batch-size", "8",
            "--image-size", "32", "--backend", "torch", "--num-workers", "0", "--device", "cpu"]
    cli("train", "--out", tmp_path / "whole", *args)
    assert "stopped after 7 steps" in cli("train", "--out", tmp_path / "part", *args, "--stop-after-steps", "7")
    cli("train", "--out", tmp_path / "part", "--resume")  # the URL comes from the run's config.json
    assert metrics(tmp_path / "part") == metrics(tmp_path / "whole")
    assert [m["images"] for m in metrics(tmp_path / "whole")] == [40, 40]
