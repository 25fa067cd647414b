"""`kdpipe demo --tiny`: the whole chain (generate, shard, teacher, cache, ladder, report) runs and resumes."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from trainer.demo import LADDER, TINY, run_demo


def _numbers(run) -> list[dict]:
    """A run's metrics without the timing and memory figures (which differ between identical runs)."""
    from trainer.metrics import TIMING_FIELDS as skip
    return [{k: v for k, v in json.loads(line).items() if k not in skip}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _final(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow
def test_tiny_demo_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "demo"
    report = run_demo(out, TINY)
    text = report.read_text()
    for section in ("## Table I", "## Table II", "## Table III", "## Teacher uncertainty", "## Demo stages"):
        assert section in text
    # Every stage left its product: shards, a complete cache, each ladder run with all epochs.
    assert (out / "shards" / "manifest.json").is_file() and (out / "teacher.zarr" / "zarr.json").is_file()
    for mode in LADDER:
        lines = (out / "runs" / mode / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == TINY.epochs
        cfg = json.loads((out / "runs" / mode / "config.json").read_text())
        assert cfg["seed"] == TINY.seed and cfg["epochs"] == TINY.epochs and cfg["mode"] == mode
        assert (cfg["teacher_cache"] is not None) == (mode != "hard")
    # Table I's numbers are the runs' final metrics.
    kd, dual = _final(out / "runs" / "kd"), _final(out / "runs" / "dual")
    s0 = TINY.students[0]
    row = (f"| {s0} | {kd['s0']['val_top1']:.2f} | {kd['s0']['val_top5']:.2f} | {dual['s0']['val_top1']:.2f} | "
           f"{dual['s0']['val_top5']:.2f} | {dual['s0']['val_top1'] - kd['s0']['val_top1']:+.2f} |")
    assert row in text
    assert (out / "report" / "val_accuracy.png").is_file() and (out / "report" / "w_histogram.png").is_file()

    # A second call finds every stage finished and only rebuilds the report; a lost run is redone.
    capsys.readouterr()
    before = {m: _numbers(out / "runs" / m) for m in LADDER}
    shutil.rmtree(out / "runs" / "dual")
    run_demo(out, TINY)
    said = capsys.readouterr().out
    assert said.count("finished earlier, skipped") == len(LADDER) and "dual: training mode dual" in said
    assert before == {m: _numbers(out / "runs" / m) for m in LADDER}  # same seed: the redone run is the same


def test_demo_refuses_a_directory_made_with_other_settings(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps(dataclasses.asdict(dataclasses.replace(TINY, epochs=3))))
    with pytest.raises(ValueError, match=r"other settings \(epochs: 3 -> 1"):
        run_demo(out, TINY)
