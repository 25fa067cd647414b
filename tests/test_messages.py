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
    return {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
            if isinstance(b, (ast.Name, ast.Attribute))}


def test_every_user_error_class_is_defined_in_errors_py():
    family = _error_names()
    assert {"KdpipeError", "NonFiniteLossError", "OptionsMismatch"} <= family
    elsewhere = [f"{p.relative_to(ROOT)}:{n.lineno} {n.name}" for p in _sources() if p != ERRORS_FILE
                 for n in ast.walk(ast.parse(p.read_text()))
                 if isinstance(n, ast.ClassDef) and _base_names(n) & family]
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
    for kw, text in (({"batch_size": 2.5}, "batch_size must be a whole number, got 2.5"),
                     ({"batch_size": "4"}, "batch_size must be a whole number, got '4'"),
                     ({"batch_size": 4, "seed": 1.5}, "seed must be a whole number, got 1.5")):
        with pytest.raises(errors.ConfigError, match=text):
            ImageNet100Loader(tmp_path, "train", **kw)
    with pytest.raises(errors.ConfigError, match="invalid AugSpec: flip_p"):
        AugSpec(flip_p=2.0)
    with pytest.raises(errors.ConfigError, match="backend must be one of auto, dali, torch, got 'nope'"):
        ImageNet100Loader(tmp_path, "train", 4, backend="nope")
    with pytest.raises(errors.ConfigError, match="give at least one run directory"):
        write_report([], tmp_path / "rep")
    with pytest.raises(errors.MissingDataError, match="manifest.json: no manifest"):
        manifest_sha256(tmp_path)


# ---------------------------------------------------------------- logging and progress

@pytest.fixture
def kdpipe_logger():
    """Restore the "kdpipe" logger's level and handlers after a test that configures it."""
    import logging

    root = logging.getLogger("kdpipe")
    level, handlers = root.level, list(root.handlers)
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers


def _synth(*flags: str, tmp_path: Path):
    from click.testing import CliRunner

    from trainer.cli import main

    args = [*flags, "synth", "--out", str(tmp_path / "tree"), "--num-classes", "1", "--train-per-class", "2",
            "--val-per-class", "1", "--size", "16", "16"]
    return CliRunner().invoke(main, args)


def test_cli_levels_info_by_default_quiet_with_q_debug_with_v(tmp_path, monkeypatch, kdpipe_logger):
    from pipeline.core import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a plain progress line at every image
    res = _synth(tmp_path=tmp_path / "a")
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == ["synth: 1/3 img (33 %)", "synth: 2/3 img (67 %)", "synth: 3/3 img (100 %)"]
    assert "wrote 2 train and 1 val images of 1 classes" in res.stdout
    quiet = _synth("-q", tmp_path=tmp_path / "b")
    assert quiet.exit_code == 0 and quiet.stderr == "" and "wrote 2 train" in quiet.stdout
    verbose = _synth("-v", tmp_path=tmp_path / "c")
    assert verbose.exit_code == 0 and "synth: 3 images of 1 classes into" in verbose.stderr
    assert "synth: 3/3 img (100 %)" in verbose.stderr
    both = _synth("-v", "-q", tmp_path=tmp_path / "d")
    assert both.exit_code == 2 and "give -v/--verbose or -q/--quiet, not both" in both.output
    assert not (tmp_path / "d").exists()


def test_progress_off_a_terminal_writes_plain_lines_and_no_redraws(capsys, monkeypatch, kdpipe_logger):
    from pipeline.core import progress
    from pipeline.core.log import configure

    configure(0)
    assert not progress.is_terminal()  # pytest captures stderr
    for _ in progress.progress_bar(range(4), desc="job", unit="img"):
        pass  # a short job: its log shows nothing
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    with progress.progress_bar(total=5, desc="job", unit="img") as bar:
        bar.update(2)
        bar.set_postfix_str("loss 0.5")
        bar.update(3)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == ["job: 2/5 img (40 %)", "job: 5/5 img (100 %), loss 0.5"]
    with progress.progress_bar(total=5, desc="job", enabled=False) as bar:
        bar.update(5)
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_is_a_tqdm_bar_unless_quiet(monkeypatch, kdpipe_logger):
    from tqdm import tqdm

    from pipeline.core import progress
    from pipeline.core.log import configure

    monkeypatch.setattr(progress, "is_terminal", lambda stream=None: True)
    configure(0)
    bar = progress.progress_bar(total=3, desc="job", disable=True)  # a real bar, drawn nowhere
    assert isinstance(bar, tqdm)
    bar.close()
    configure(-1)
    assert not progress.show_bar(True)
    assert isinstance(progress.progress_bar(total=3, desc="job"), progress.PlainProgress)


def test_the_trainers_progress_line_off_a_terminal(capsys, kdpipe_logger):
    from pipeline.core.log import configure
    from trainer.engine.loop import Progress

    configure(0)
    bar = Progress(0, 2, total=20, start=0, enabled=True)
    assert bar.bar is None
    for _ in range(10):
        bar.update(2, "loss 1.0")
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[0] == "epoch 1/2 step 2/20 loss 1.0" and len(err.splitlines()) == 10


def test_the_cli_prints_kdpipe_warnings_as_one_line_and_others_as_python_does():
    import subprocess
    import sys

    code = ("import warnings; from pipeline.core.log import configure; configure(); "
            f"warnings.warn_explicit('teacher cache c.zarr: recomputing 2 damaged units', UserWarning, "
            f"{str(ROOT / 'pipeline' / 'cache' / 'store.py')!r}, 235); "
            "warnings.warn_explicit('from elsewhere', UserWarning, '/elsewhere/lib.py', 7)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    lines = res.stderr.splitlines()
    assert res.returncode == 0 and lines[0] == "warning: teacher cache c.zarr: recomputing 2 damaged units"
    assert lines[1] == "/elsewhere/lib.py:7: UserWarning: from elsewhere"
