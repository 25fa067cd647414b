"""Low-level shard writing pieces: image preparation, the tar writer, sample members, worker processes."""
from __future__ import annotations

import io
import json
import struct
import tarfile

import numpy as np
import pytest
from PIL import Image


def read_tar(path):
    """(name, data offset, bytes) of every member, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, tar.extractfile(m).read()) for m in tar]


def test_tar_writer_is_byte_identical_to_tarfile(tmp_path):
    from pipeline.shards.tar_io import TarShardWriter

    members = [("00000000.jpg", b"\xff\xd8" + bytes(range(256)) * 7), ("00000000.cls", b"3"),
               ("00000000.json", b"{}"), ("00000000.i64", struct.pack("<q", 0)), ("00000001.jpg", b"x" * 512)]
    w = TarShardWriter(tmp_path / "ours.tar")
    offsets = [w.add_sample([(name, data)])[0] for name, data in members]
    nbytes, sha = w.close()
    with tarfile.open(tmp_path / "ref.tar", "w", format=tarfile.USTAR_FORMAT) as ref:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
            ref.addfile(info, io.BytesIO(data))
    ours = (tmp_path / "ours.tar").read_bytes()
    assert ours == (tmp_path / "ref.tar").read_bytes() and nbytes == len(ours)
    import hashlib

    from pipeline.core.digest import file_sha256

    assert sha == file_sha256(tmp_path / "ours.tar", block=1000) == hashlib.sha256(ours).hexdigest()
    assert [m[1] for m in read_tar(tmp_path / "ours.tar")] == offsets
    assert not (tmp_path / ".ours.tar.tmp").exists()


def test_prepare_image_paths(tmp_path):
    from pipeline.shards.image import jpeg_frame, prepare_image
    from pipeline.sources.synthetic import jpeg_bytes, synth_image

    img = synth_image(np.random.default_rng(0), 30, 40)
    base = jpeg_bytes(img)
    assert jpeg_frame(base)[:5] == (0xC0, 8, 30, 40, 3)
    (tmp_path / "base.jpg").write_bytes(base)
    p = prepare_image(tmp_path / "base.jpg")
    assert (p.reason, p.data, p.height, p.width, p.size) == ("", None, 30, 40, len(base))  # passes through
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", progressive=True)
    (tmp_path / "prog.jpg").write_bytes(buf.getvalue())
    p = prepare_image(tmp_path / "prog.jpg")
    assert p.reencoded and jpeg_frame(p.data)[0] == 0xC0  # progressive -> baseline
    (tmp_path / "tail.jpg").write_bytes(base + b"trailing junk")
    p = prepare_image(tmp_path / "tail.jpg")
    assert p.reason == "" and p.data is None and p.size == len(base) + 13  # decodes fully: kept as is
    p = prepare_image(tmp_path / "missing.jpg")
    assert p.reason.startswith("unreadable")


def test_ordered_map_keeps_order_and_bounds_work():
    from pipeline.core.procs import ordered_map

    pulled = []

    def items():
        for i in range(200):
            pulled.append(i)
            yield i

    it = ordered_map(_double_chunk, items(), workers=2, chunk=4, window=2)
    first = [next(it) for _ in range(3)]
    assert first == [0, 2, 4]
    assert len(pulled) <= 4 * 2 * 2 + 4  # in flight: workers*window chunks, plus the one refilled
    assert first + list(it) == [2 * i for i in range(200)]


def _double_chunk(xs):
    return [2 * x for x in xs]


def test_sample_json_is_canonical():
    from pipeline.sources.imagenet import SourceFile
    from pipeline.shards.image import Prepared
    from pipeline.shards.writer import sample_members

    src = SourceFile('train/n01440764/we "ird" ä\\name.JPEG', "n01440764", 3)
    members = sample_members(7, src, Prepared(None, 10, 20, 5, 4294967295), b"\xff\xd8")
    assert [n for n, _ in members] == ["00000007.jpg", "00000007.cls", "00000007.json", "00000007.i64"]
    ref = {"id": 7, "wnid": src.wnid, "label": 3, "height": 10, "width": 20, "source": src.rel,
           "jpg_crc32": 4294967295}
    assert members[2][1] == json.dumps(ref, sort_keys=True, separators=(",", ":")).encode()


def _fail_on_13(xs):
    if 13 in xs:
        raise ValueError("thirteen")
    return xs


def test_ordered_map_worker_errors_and_early_close():
    from pipeline.core.procs import WorkerError, ordered_map

    with pytest.raises(WorkerError, match="ValueError: thirteen"):
        list(ordered_map(_fail_on_13, range(40), workers=2, chunk=4))
    it = ordered_map(_double_chunk, range(1000), workers=2, chunk=4, window=1)
    assert next(it) == 0
    it.close()  # stops the workers without reading their pending results
    import multiprocessing

    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_ordered_map_starts_no_more_processes_than_chunks_or_its_cap(monkeypatch):
    import multiprocessing

    from pipeline.core import procs

    it = procs.ordered_map(_double_chunk, range(12), workers=50, chunk=4)  # 3 chunks: 3 processes, not 50
    assert next(it) == 0
    assert len(multiprocessing.active_children()) == 3
    assert [0] + list(it) == [2 * i for i in range(12)]
    monkeypatch.setattr(procs, "usable_cores", lambda: 1)  # cap: WORKERS_PER_CORE a core
    it = procs.ordered_map(_double_chunk, range(400), workers=50, chunk=4)
    assert next(it) == 0
    assert len(multiprocessing.active_children()) == procs.WORKERS_PER_CORE
    assert [0] + list(it) == [2 * i for i in range(400)]


def test_hash_process_matches_file_hash(tmp_path):
    from pipeline.core.digest import file_sha256
    from pipeline.shards.tar_io import HashProcess

    (tmp_path / "a").write_bytes(b"x" * 3_000_000)
    hasher = HashProcess()
    try:
        assert hasher(tmp_path / "a") == file_sha256(tmp_path / "a")
    finally:
        hasher.close()


def test_hash_process_hashes_a_growing_file_as_fed(tmp_path):
    """Feeds hash what is written so far; the digest adds the rest; forget drops a half-hashed file."""
    import hashlib

    from pipeline.shards.tar_io import HashProcess

    path = tmp_path / "growing"
    data = bytes(range(256)) * 40_000  # 10 MB, fed at odd offsets
    hasher = HashProcess()
    try:
        with open(path, "wb") as f:
            for a, b in [(0, 12_345), (12_345, 5_000_001), (5_000_001, len(data) - 7)]:
                f.write(data[a:b])
                f.flush()
                hasher.feed(path, b)
            f.write(data[-7:])
        assert hasher(path) == hashlib.sha256(data).hexdigest()
        other = tmp_path / "other"
        other.write_bytes(b"abc" * 1000)
        hasher.feed(other, 1500)
        hasher.forget(other)
        other.write_bytes(b"xyz")  # a new file under the same name starts from scratch
        assert hasher(other) == hashlib.sha256(b"xyz").hexdigest()
    finally:
        hasher.close()


def test_tar_writer_feeds_the_hasher_and_stays_byte_identical(tmp_path, monkeypatch):
    import hashlib

    import pipeline.shards.tar_io as sio

    monkeypatch.setattr(sio, "HASH_FEED", 3000)  # feed (and start writeback) every few samples
    members = [(f"{k:08d}.jpg", bytes([k]) * (700 + 13 * k)) for k in range(20)]
    hasher = sio.HashProcess()
    try:
        fed = []
        feed = hasher.feed
        monkeypatch.setattr(hasher, "feed", lambda p, upto: (fed.append(upto), feed(p, upto)))
        w = sio.TarShardWriter(tmp_path / "fed.tar", hasher)
        for m in members:
            w.add_sample([m])
        nbytes, sha = w.close()
    finally:
        hasher.close()
    plain = sio.TarShardWriter(tmp_path / "plain.tar")
    for m in members:
        plain.add_sample([m])
    assert plain.close() == (nbytes, sha)
    assert len(fed) >= 5 and fed == sorted(fed) and fed[-1] < nbytes
    assert sha == hashlib.sha256((tmp_path / "fed.tar").read_bytes()).hexdigest()
    assert (tmp_path / "fed.tar").read_bytes() == (tmp_path / "plain.tar").read_bytes()


def test_a_full_disk_while_writing_a_shard_or_a_file_names_it(tmp_path, monkeypatch):
    import errno
    import os

    from pipeline.core.atomic import atomic_write_bytes
    from pipeline.shards import tar_io

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")  # what write() and fsync() raise: no file name

    monkeypatch.setattr(tar_io.os, "writev", full)
    w = tar_io.TarShardWriter(tmp_path / "train-000000.tar")
    with pytest.raises(OSError) as e:
        w.add_sample([("00000000.cls", b"3")])
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "train-000000.tar")
    w.abort()
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "manifest.json", b"{}")
    assert e.value.filename == str(tmp_path / "manifest.json") and not list(tmp_path.iterdir())
