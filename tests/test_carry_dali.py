"""tools/carry_dali.py: wheels cut into parts and rebuilt exactly, damage and missing parts named."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import carry_dali as carry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def wheels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    out = []
    for k, size in enumerate((2500, 10, 7001)):
        p = src / f"pkg{k}-1.0-py3-none-any.whl"
        p.write_bytes(bytes((k * 31 + i) % 251 for i in range(size)))
        out.append(p)
    return out


def test_parts_rebuild_every_wheel_exactly(tmp_path, wheels):
    bundle = carry.pack(wheels, tmp_path / "packed", part_bytes=1000)
    assert len(bundle["parts"]) == 10  # 9,511 bytes in parts of 1,000
    for k in range(len(bundle["parts"])):
        carry.receive(k, tmp_path / "packed", tmp_path / "landing")
    rebuilt = carry.assemble(tmp_path / "landing")
    assert [p.name for p in rebuilt] == [w.name for w in wheels]
    assert all(p.read_bytes() == w.read_bytes() for p, w in zip(rebuilt, wheels))


def test_a_missing_or_damaged_part_is_named(tmp_path, wheels):
    carry.pack(wheels, tmp_path / "packed", part_bytes=4000)
    carry.receive(0, tmp_path / "packed", tmp_path / "landing")
    with pytest.raises(SystemExit, match="part-1 missing"):
        carry.assemble(tmp_path / "landing")
    for k in (1, 2):
        carry.receive(k, tmp_path / "packed", tmp_path / "landing")
    part = tmp_path / "landing" / "part-1"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(SystemExit, match="part-1: sha256 differs"):
        carry.assemble(tmp_path / "landing")


def test_names_in_the_bundle_are_never_paths(tmp_path, wheels):
    carry.pack(wheels, tmp_path / "packed", part_bytes=100_000)
    carry.receive(0, tmp_path / "packed", tmp_path / "landing")
    bundle = json.loads((tmp_path / "landing" / "bundle.json").read_text())
    bundle["wheels"][0]["name"] = "../../evil.whl"
    (tmp_path / "landing" / "bundle.json").write_text(json.dumps(bundle))
    with pytest.raises(SystemExit, match="not a wheel name"):
        carry.assemble(tmp_path / "landing")
    assert not (tmp_path / "evil.whl").exists()
