"""The Zarr v3 teacher cache store: layout, fingerprint checks, progress markers, reader, top-k."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import zarr

from pipeline.core.errors import CacheDamageError, CacheError, MissingDataError
from pipeline.cache.store import (
    CacheLayout, CacheMismatchError, IncompleteCacheError, TeacherCache, TeacherCacheWriter,
    cache_fingerprint, entropy_and_weight, expand_topk, log_softmax, open_cache, topk_logprobs)

FP = {"manifest_sha256": "ab" * 32, "wnids": ["n01", "n02", "n03", "n04", "n05"], "seed": 7, "image_size": 32,
      "normalize": True, "teacher": "resnet50", "layout_version": 1}


def fake_logits(epoch: int, lo: int, hi: int, c: int) -> np.ndarray:
    """Deterministic logits per (epoch, id), like a teacher would give: wide range, some confident rows."""
    rng = np.random.default_rng([epoch, lo])
    return (rng.normal(0, 3, size=(hi - lo, c)) * np.linspace(0.2, 3, hi - lo)[:, None]).astype(np.float32)


def fill(writer: TeacherCacheWriter, units=None) -> None:
    lay = writer.layout
    for e, c in units if units is not None else lay.units():
        lo, hi = lay.id_range(c)
        writer.write_unit(e, c, fake_logits(e, lo, hi, lay.num_classes))


@pytest.fixture
def layout() -> CacheLayout:
    return CacheLayout(epochs=3, num_samples=21, num_classes=5, chunk_n=8)


def test_units_partition_the_store_by_rank(layout):
    assert layout.chunks_per_epoch == 3 and layout.id_range(2) == (16, 21)
    r0, r1, r2 = (set(layout.units(r, 3)) for r in range(3))
    assert not (r0 & r1 or r0 & r2 or r1 & r2)
    assert r0 | r1 | r2 == set(layout.units()) and len(layout.units()) == 9


def test_round_trip_full_logits(tmp_path, layout):
    w = TeacherCacheWriter.create(tmp_path / "c.zarr", layout, FP)
    fill(w)
    with TeacherCache(tmp_path / "c.zarr") as cache:
        assert (cache.epochs, cache.num_samples, cache.num_classes) == (3, 21, 5)
        cache.check_complete()
        ids = np.array([20, 0, 9, 9, 15])
        for e in (1, 0, 2):
            logits, weight = cache.lookup(e, ids)
            full = np.concatenate([fake_logits(e, *layout.id_range(c), 5) for c in range(3)])
            assert logits.dtype == np.float32 and logits.shape == (5, 5)
            np.testing.assert_array_equal(logits, full[ids].astype(np.float16).astype(np.float32))
            np.testing.assert_allclose(weight, entropy_and_weight(full[ids])[1], rtol=1e-6)
            assert weight.dtype == np.float32


def test_entropy_weight_values():
    ent, w = entropy_and_weight(np.array([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]))
    np.testing.assert_allclose(ent, [math.log(4), 0.0], atol=1e-6)
    np.testing.assert_allclose(w, [0.0, 1.0], atol=1e-6)


def test_store_opens_with_plain_zarr_and_documented_layout(tmp_path, layout):
    fill(TeacherCacheWriter.create(tmp_path / "c.zarr", layout, FP))
    g = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert g.metadata.zarr_format == 3
    assert sorted(g.array_keys()) == ["checksum", "done", "entropy", "logits", "weight"]
    expect = {"logits": ((3, 21, 5), np.float16, (1, 8, 5)), "weight": ((3, 21), np.float32, (1, 8)),
              "entropy": ((3, 21), np.float32, (1, 8)), "done": ((3, 3), np.uint8, (1, 1))}
    for name, (shape, dtype, chunks) in expect.items():
        a = g[name]
        assert (a.shape, a.dtype, a.chunks) == (shape, dtype, chunks), name
        assert a.shards is None, "no sharding codec: parallel writers would lose data"
        codecs = [type(c).__name__ for c in a.metadata.codecs]
        assert codecs in (["BytesCodec", "ZstdCodec"], ["BytesCodec"]), (name, codecs)
    attrs = dict(g.attrs)
    assert attrs["format"] == "kdpipe-teacher-cache" and attrs["layout_version"] == 2
    assert (attrs["epochs"], attrs["num_samples"], attrs["num_classes"], attrs["topk"]) == (3, 21, 5, 0)
    assert attrs["fingerprint"] == FP
    assert g["done"][:].all()
    np.testing.assert_allclose(g["entropy"][1, :8], entropy_and_weight(fake_logits(1, 0, 8, 5))[0], rtol=1e-6)


def test_check_names_each_differing_field_with_both_values(tmp_path, layout):
    fill(TeacherCacheWriter.create(tmp_path / "c.zarr", layout, FP))
    cache = TeacherCache(tmp_path / "c.zarr")
    cache.check(dict(FP))  # equal: passes
    cache.check({"seed": 7, "wnids": ("n01", "n02", "n03", "n04", "n05")})  # a tuple equals the stored list
    with pytest.raises(CacheMismatchError) as err:
        cache.check({**FP, "seed": 8, "image_size": 64, "new_field": 1})
    assert err.value.fields == ["seed", "image_size", "new_field"]
    msg = str(err.value)
    assert "seed: cache has 7, expected 8" in msg and "image_size: cache has 32, expected 64" in msg
    assert "new_field: cache has '<missing>'" in msg and str(tmp_path / "c.zarr") in msg
    assert "manifest_sha256" not in msg


def test_incomplete_cache_is_refused_naming_epochs(tmp_path, layout):
    w = TeacherCacheWriter.create(tmp_path / "c.zarr", layout, FP)
    fill(w, [(0, 0), (0, 1), (0, 2), (1, 0), (2, 1)])
    cache = TeacherCache(tmp_path / "c.zarr", prefetch=False)
    assert cache.missing() == {1: 2, 2: 2}
    with pytest.raises(IncompleteCacheError, match=r"epoch 1 \(2/3 chunks missing\), epoch 2 \(2/3") as err:
        cache.check_complete()
    assert err.value.missing_epochs == [1, 2]
    cache.lookup(0, [1, 2])  # a complete epoch reads
    with pytest.raises(IncompleteCacheError, match="epoch 2"):
        cache.lookup(2, [1, 2])


def test_reopen_resumes_and_refuses_a_different_fingerprint(tmp_path, layout):
    path = tmp_path / "c.zarr"
    w = TeacherCacheWriter.create(path, layout, FP)
    fill(w, layout.units()[:4])
    stale = path / "logits" / "c" / "2" / "0.0123abcd.partial"  # what a kill -9 inside a chunk write leaves
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"half a chunk")
    again = TeacherCacheWriter.create(path, layout, FP)
    assert not stale.exists()
    assert again.pending_units() == layout.units()[4:]
    assert again.pending_units(1, 2) == layout.units()[4:][1::2]  # the pending units, dealt out evenly
    with pytest.raises(CacheMismatchError, match="teacher: cache has 'resnet50', expected 'resnet18'"):
        TeacherCacheWriter.create(path, layout, {**FP, "teacher": "resnet18"})
    with pytest.raises(CacheMismatchError, match="epochs: cache has 3, expected 4"):
        TeacherCacheWriter.create(path, CacheLayout(4, 21, 5, 8), FP)


def test_writer_refuses_bad_logits(tmp_path, layout):
    w = TeacherCacheWriter.create(tmp_path / "c.zarr", layout, FP)
    with pytest.raises(ValueError, match=r"shape \(5, 5\)"):
        w.write_unit(0, 2, np.zeros((4, 5)))
    bad = np.zeros((8, 5), np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite .* epoch 0, ids \[0, 8\)"):
        w.write_unit(0, 0, bad)
    bad[3, 1] = 1e5
    with pytest.raises(ValueError, match=r"exceed float16's range \(max \|z\| = 1e\+05"):
        w.write_unit(0, 0, bad)
    assert not w.done_mask().any()


def test_lookup_refuses_out_of_range_ids_and_epochs(tmp_path, layout):
    fill(TeacherCacheWriter.create(tmp_path / "c.zarr", layout, FP))
    cache = TeacherCache(tmp_path / "c.zarr")
    with pytest.raises(IndexError, match="sample id 21"):
        cache.lookup(0, [3, 21])
    with pytest.raises(IndexError, match="augmentation epoch 3"):
        cache.lookup(3, [0])


def test_prefetch_loads_the_next_epoch_and_pickles(tmp_path, layout):
    fill(TeacherCacheWriter.create(tmp_path / "c.zarr", layout, FP))
    cache = open_cache(tmp_path / "c.zarr")
    assert open_cache(cache) is cache
    cache.lookup(2, [0])
    nxt_epoch, fut = cache._next
    assert nxt_epoch == 0  # wraps: epoch 2 is the last
    np.testing.assert_array_equal(fut.result().weight, cache.load_epoch(0).weight)
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone.lookup(1, [4, 5])[0], cache.lookup(1, [4, 5])[0])
    cache.close()
    clone.close()


def test_topk_round_trip(tmp_path):
    lay = CacheLayout(epochs=2, num_samples=10, num_classes=12, chunk_n=4, topk=3)
    fill(TeacherCacheWriter.create(tmp_path / "k.zarr", lay, FP))
    g = zarr.open_group(str(tmp_path / "k.zarr"), mode="r")
    assert sorted(g.array_keys()) == ["checksum", "done", "entropy", "topk_indices", "topk_values", "weight"]
    assert g["topk_values"].dtype == np.float16 and g["topk_indices"].dtype == np.int16
    assert g["topk_values"].shape == (2, 10, 3)
    cache = TeacherCache(tmp_path / "k.zarr")
    z = np.concatenate([fake_logits(1, *lay.id_range(c), 12) for c in range(3)])
    logp, weight = cache.lookup(1, np.arange(10))
    exact = log_softmax(z)
    top = np.argsort(-exact, axis=1)[:, :3]
    # kept classes: their log-probability (float16); the rest share the remaining mass uniformly
    np.testing.assert_allclose(np.take_along_axis(logp, top, 1), np.take_along_axis(exact, top, 1), atol=2e-2)
    np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, atol=1e-2)
    rest = np.ones_like(logp, bool)
    np.put_along_axis(rest, top, False, axis=1)
    for row in range(10):
        others = logp[row, rest[row]]
        np.testing.assert_allclose(others, others[0], rtol=1e-6)
        want_rest = 1 - np.exp(np.take_along_axis(exact, top, 1)[row]).sum()
        np.testing.assert_allclose(np.exp(others).sum(), want_rest, atol=1e-2)
    np.testing.assert_allclose(weight, entropy_and_weight(z)[1], rtol=1e-6)  # weight from the full logits


def test_expand_topk_keeps_tempered_distribution_when_the_tail_is_small():
    z = np.array([[10.0, 2.0, 1.0, -5.0, -6.0, -7.0]])
    values, indices = topk_logprobs(z, 3)
    assert indices.tolist() == [[0, 1, 2]]
    logp = expand_topk(values, indices, 6)
    for tau, atol in ((1.0, 1e-3), (4.0, 1e-2)):  # the flattened tail matters more at high temperature
        def soft(x):
            e = np.exp(x / tau - (x / tau).max())
            return e / e.sum()
        np.testing.assert_allclose(soft(logp[0]), soft(z[0]), atol=atol)


def test_cache_fingerprint_records_everything_views_depend_on():
    from pipeline.core.augment import AugSpec

    spec = AugSpec(image_size=64)
    fp = cache_fingerprint(manifest_sha256="m", wnids=["b", "a"], spec=spec, seed=3,
                           teacher="resnet50", weights_sha256="w", precision="bf16", backend="torch", topk=0)
    assert fp["aug_fingerprint"] == spec.fingerprint() and fp["aug_spec"]["scale"] == [0.08, 1.0]
    assert (fp["image_size"], fp["seed"], fp["wnids"], fp["layout_version"]) == (64, 3, ["b", "a"], 2)
    assert fp["normalization"]["mean"][0] == pytest.approx(0.485 * 255)
    for key in ("manifest_sha256", "teacher", "weights_sha256", "precision", "backend",
                "kdpipe_version", "topk"):
        assert key in fp


def test_create_never_clobbers_a_foreign_path_nor_leaves_a_half_store(tmp_path, layout):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a teacher cache"):
        TeacherCacheWriter.create(tmp_path / "taken", layout, FP)
    TeacherCacheWriter.create(tmp_path / "c.zarr", layout, FP)
    (tmp_path / "empty").mkdir()  # an empty directory made for it is taken, like `shard --out`
    TeacherCacheWriter.create(tmp_path / "empty", layout, FP)
    assert (tmp_path / "empty" / "zarr.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr", "empty", "taken"]  # no temp dir left behind


# ---------------------------------------------------------------- integrity: per-unit checksums

def chunk_file(store, name: str, coords: tuple):
    from pathlib import Path

    g = zarr.open_group(str(store), mode="r")
    return Path(store) / name / g[name].metadata.encode_chunk_key(coords)


def flip_byte(path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("topk", [0, 2])
def test_damage_is_refused_naming_epoch_and_chunk_and_recomputed_by_the_writer(tmp_path, topk):
    layout = CacheLayout(epochs=3, num_samples=21, num_classes=5, chunk_n=8, topk=topk)
    store = tmp_path / "c.zarr"
    fill(TeacherCacheWriter.create(store, layout, FP))
    clean = {n: zarr.open_group(str(store), mode="r")[n][:] for n in layout.data_arrays}
    first = layout.data_arrays[0]
    chunk_file(store, first, (1, 2, 0)).unlink()                # a lost chunk file: reads back as zeros
    flip_byte(chunk_file(store, "weight", (2, 0)))               # a flipped byte inside a zstd frame
    chunk_file(store, "entropy", (0, 1)).write_bytes(b"\x28\xb5")  # a cut file: zstd cannot decode it
    cache = TeacherCache(store, prefetch=False)
    with pytest.raises(CacheDamageError, match=rf"epoch 1 chunk 2: {first} fails its checksum: chunk file "
                                               rf"{first}/c/1/2/0 is missing \(ids 16\.\.20\)") as err:
        cache.lookup(1, [0, 17])
    assert err.value.units == [(1, 2)] and "rerun `kdpipe cache-teacher` with the same options" in str(err.value)
    with pytest.raises(CacheDamageError, match=r"epoch 2 chunk 0: weight (fails its checksum|chunk unreadable)"):
        cache.lookup(2, [3])
    cache.lookup(0, [3])  # entropy is not read for training: epoch 0 serves; verify and the writer see it
    report = cache.verify()
    assert not report.ok and report.checked == 9 and report.missing == {}
    assert [(d.epoch, d.chunk, d.array) for d in report.damage] == [(0, 1, "entropy"), (1, 2, first), (2, 0, "weight")]
    assert "chunk unreadable (RuntimeError" in report.damage[0].why
    writer = TeacherCacheWriter(store)
    with pytest.warns(UserWarning, match="recomputing 3 damaged units"):
        pending = writer.pending_units()
    assert pending == [(0, 1), (1, 2), (2, 0)] and [d.array for d in writer.damaged] == ["entropy", first, "weight"]
    assert writer.pending_units(1, 2) == [(1, 2)]  # dealt out like any pending unit (rank 1: no warning)
    fill(writer, pending)
    assert writer.pending_units() == [] and TeacherCache(store).verify().ok
    again = zarr.open_group(str(store), mode="r")
    for name, arr in clean.items():
        np.testing.assert_array_equal(again[name][:], arr, err_msg=name)


def test_a_lost_checksum_or_done_marker_is_never_taken_for_clean_data(tmp_path, layout):
    store = tmp_path / "c.zarr"
    fill(TeacherCacheWriter.create(store, layout, FP))
    chunk_file(store, "checksum", (0, 1, 0)).unlink()
    chunk_file(store, "done", (2, 2)).write_bytes(b"")  # unreadable marker: the unit is redone
    with pytest.raises(CacheDamageError, match="epoch 0 chunk 1: logits fails its checksum"):
        TeacherCache(store).lookup(0, [9])
    with pytest.raises(IncompleteCacheError, match=r"epoch 2 \(1/3 chunks missing\)"):
        TeacherCache(store).lookup(2, [0])
    with pytest.warns(UserWarning):
        assert TeacherCacheWriter(store).pending_units() == [(0, 1), (2, 2)]


def test_old_and_broken_stores_are_refused_in_one_line(tmp_path, layout):
    store = tmp_path / "c.zarr"
    fill(TeacherCacheWriter.create(store, layout, FP))
    g = zarr.open_group(str(store), mode="r+")
    g.attrs["layout_version"] = 1
    for opener in (TeacherCache, TeacherCacheWriter):
        with pytest.raises(CacheError, match=r"layout_version 1 \(written before per-unit checksums: its units "
                                             r"cannot be verified\) is not the supported 2; make a new cache"):
            opener(store)
    with pytest.raises(CacheError, match="layout_version 1"):
        TeacherCacheWriter.create(store, layout, FP)  # never overwritten either
    g.attrs["layout_version"] = 2
    (store / "weight" / "zarr.json").unlink()
    with pytest.raises(CacheError, match=r"arrays weight missing"):
        TeacherCache(store)
    (store / "zarr.json").write_text("{")
    with pytest.raises(CacheError, match=r"c\.zarr: not a readable Zarr store"):
        TeacherCache(store)
    with pytest.raises(MissingDataError, match="no teacher cache at"):
        TeacherCache(tmp_path / "nothing.zarr")
