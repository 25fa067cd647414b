"""What both backends share (pipeline/reader/backends/base.py): the bad-sample error, skipping, the size check."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.reader.backends.base import Backend, SkipLog, sample_error, saturation_matrices, size_mismatch
from pipeline.core.errors import CorruptSampleError


class _Index:
    split = "train"
    shard_dir = "/data/shards"

    def shard_path(self, sample_id):
        if sample_id > 9:
            raise IndexError(f"sample id {sample_id} out of range")
        return f"/data/shards/train-00000{sample_id // 5}.tar"


def test_sample_error_names_split_id_shard_and_the_way_out():
    err = sample_error(_Index(), 7, "not\na   JPEG")
    assert isinstance(err, CorruptSampleError)
    assert str(err) == ("train sample 7 in shard /data/shards/train-000001.tar: not a JPEG "
                        "(--skip-corrupt, or skip_corrupt=True, drops such samples and counts them)")
    assert "(no shard: sample id 12 out of range)" in str(sample_error(_Index(), 12, "x"))


def test_skip_log_raises_or_records():
    with pytest.raises(CorruptSampleError, match="sample 3 "):
        SkipLog(False).bad(_Index(), 3, "bad")
    log = SkipLog(True)
    log.bad(_Index(), 3, "bad")
    log.record(CorruptSampleError("named elsewhere"), 4)
    assert [i for i, _ in log.skipped] == [3, 4] and "bad" in log.skipped[0][1]


def test_size_mismatch_and_saturation():
    assert size_mismatch((375, 500), (375, 500)) is None
    assert size_mismatch((375, 500), (500, 375)) == "decoded 500x375 but the index says 375x500"
    m = saturation_matrices(np.array([0.0, 1.0]))
    np.testing.assert_allclose(m[1], np.eye(3), atol=1e-7)
    np.testing.assert_allclose(m[0] @ np.array([10.0, 20.0, 30.0]), [18.15] * 3, rtol=1e-6)  # all grey


def test_both_backends_have_the_protocols_shape():
    from pipeline.reader.backends.dali_backend import DaliBackend
    from pipeline.reader.backends.torch_backend import TorchBackend
    from pipeline.reader.loader import backend_class

    for cls in (TorchBackend, DaliBackend):
        assert callable(getattr(cls, "iter_batches")) and isinstance(getattr(cls, "name"), str)
        assert isinstance(getattr(cls, "skipped"), property)
    assert backend_class("torch") is TorchBackend and Backend.__name__ == "Backend"
