"""The assumptions table (trainer/report/assumptions.py): one source for docs/train.md and every report."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from trainer.report import assumptions as asm
from trainer.config import TrainConfig, make_config

DOCS = Path(__file__).resolve().parent.parent / "docs" / "train.md"


def test_docs_section_is_the_rendered_table():
    """docs/train.md holds exactly the table the code renders (regenerate: python -m trainer.report.assumptions)."""
    text = DOCS.read_text()
    head = "## Assumptions where the paper is silent"
    assert text.count(head) == 1
    section = text[text.index(head):]
    assert "\n".join(asm.docs_table()) in section.split("\n## ")[0]


def test_missing_values_are_the_code_defaults():
    """For every key the current TrainConfig has, MISSING (what an old config.json means) is its default."""
    now = dataclasses.asdict(TrainConfig())
    checked = 0
    for key, value in asm.MISSING.items():
        node = now
        for part in key.split("."):
            node = node.get(part, asm._ABSENT) if isinstance(node, dict) else asm._ABSENT
        if node is not asm._ABSENT:
            assert node == value, key
            checked += 1
    assert checked >= 4  # loss.direction, loss.entropy_tau, optim.warmup_epochs, batch_size exist already


def test_every_key_reads_from_a_current_config():
    for mode in ("hard", "kd", "uw-kd", "dual"):
        cfg = dataclasses.asdict(make_config(mode))
        assert asm.departures(cfg) == [], mode
        for row in asm.ASSUMPTIONS:
            for key in row.keys:
                assert asm.config_value(cfg, key, default=asm._ABSENT) is not asm._ABSENT, key


def test_old_files_and_the_weight_function():
    assert asm.config_value({"loss": {"uncertainty": True}}, "loss.weight_fn") == "confidence"
    assert asm.config_value({"loss": {"uncertainty": False}}, "loss.weight_fn") == "none"
    assert asm.config_value({"loss": {"weight_fn": "entropy", "uncertainty": True}}, "loss.weight_fn") == "entropy"
    assert asm.config_value({}, "val_resize") == "shorter" and asm.config_value({}, "dropout") is None
    assert asm.config_value({"optim": {"warmup_epochs": 2.5}}, "optim.warmup_epochs") == 2.5
    assert asm.default_value("kd", "loss.weight_fn") == "none"
    assert asm.default_value("uw-kd", "loss.weight_fn") == "confidence"
    assert asm.default_value("uw-kd", "loss.alpha") == 0.3 and asm.default_value("dual", "loss.alpha") == 0.4


def test_departures_are_per_mode():
    uw = {"mode": "uw-kd", "loss": {"uncertainty": False, "alpha": 0.3, "beta": 0.7}, "dropout": 0.0}
    found = {(key, have, want) for _, key, have, want in asm.departures(uw)}
    assert found == {("loss.weight_fn", "none", "confidence"), ("dropout", 0.0, None)}
    kd = {"mode": "kd", "loss": {"weight_fn": "none", "alpha": 0.3}, "optim": {"warmup_epochs": 0}}
    assert asm.departures(kd) == []  # kd's w = 1 is kd's default; 0 equals 0.0
    section = "\n".join(asm.report_section([("uw", uw), ("kd", kd)]))
    assert "| uw: `loss.weight_fn` = none (default confidence) |" in section
    assert "| uw: `dropout` = 0.0 (default none) |" in section and "kd:" not in section
