"""One error policy, logging and one progress helper (issue 19, item 3)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.core import errors

ROOT = Path(__file__).resolve().parent.parent
ERRORS_FILE = ROOT / "pipeline" / "core" / "errors.py"


def _sources() -> list[Path]:
    return sorted(p for pkg in ("pipeline", "trainer") for p in (ROOT / pkg).rglob("*.py"))


def _error_names() -> set[str]:
    return {n.name for n in ast.parse(ERRORS_FILE.read_text()).body if isinstance(n, ast.ClassDef)}


def _base_names(node: ast.ClassDef) -> set[str]:
    return {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))}


def test_every_user_error_class_is_defined_in_errors_py():
    family = _error_names()
    assert {"KdpipeError", "NonFiniteLossError", "OptionsMismatch"} <= family
    elsewhere = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name}" for p in _sources() if p != ERRORS_FILE
                 for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef) and _base_names(n) & family]
    assert elsewhere == [], elsewhere


def test_moved_errors_keep_their_bases_and_old_import_paths():
    from pipeline.shards.writer import OptionsMismatch
    from trainer.engine.loop import NonFiniteLossError

    assert OptionsMismatch is errors.OptionsMismatch and issubclass(OptionsMismatch, ValueError)
    assert NonFiniteLossError is errors.NonFiniteLossError and issubclass(NonFiniteLossError, FloatingPointError)
    assert OptionsMismatch.exit_code == NonFiniteLossError.exit_code == 1


def test_the_cli_translates_no_builtin_errors():
    """User errors reach the CLI as KdpipeErrors; a ValueError or FileNotFoundError is a bug and stays loud."""
    tree = ast.parse((ROOT / "trainer" / "cli.py").read_text())
    caught = [h.lineno for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.type is not None
              and {"ValueError", "FileNotFoundError"} & {n.id for n in ast.walk(h.type) if isinstance(n, ast.Name)}]
    assert caught == []


def test_user_arguments_of_the_loader_and_report_are_config_errors(tmp_path):
    from pipeline.core.augment import AugSpec
    from pipeline.reader.index import manifest_sha256
    from pipeline.reader.loader import ImageNet100Loader
    from trainer.report.build import write_report

    with pytest.raises(errors.ConfigError, match="batch_size must be >= 1, got 0"):
        ImageNet100Loader(tmp_path, "train", 0)
    with pytest.raises(errors.ConfigError, match="num_workers must be >= 0"):
        ImageNet100Loader(tmp_path, "train", 4, num_workers=-1)
    with pytest.raises(errors.ConfigError, match="invalid AugSpec: flip_p"):
        AugSpec(flip_p=2.0)
    with pytest.raises(errors.ConfigError, match="give at least one run directory"):
        write_report([], tmp_path / "rep")
    with pytest.raises(errors.MissingDataError, match="manifest.json: no manifest"):
        manifest_sha256(tmp_path)
