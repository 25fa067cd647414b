"""What the CLI tests share: run `kdpipe`, check how it ended, pick out its one error line."""
from __future__ import annotations

from click.testing import CliRunner

from trainer.cli import main


def cli(*args, code: int = 0, env: dict | None = None) -> str:
    """Run `kdpipe ARGS`; assert the exit code, that the CLI (not an escaped exception) ended it, and that no
    traceback (ours or a DataLoader worker's) reached the output."""
    res = CliRunner(env=env).invoke(main, [str(a) for a in args])
    assert res.exit_code == code, res.output
    if code:
        assert type(res.exception) is SystemExit, f"escaped: {res.exception!r}\n{res.output}"
    assert "Traceback" not in res.output and "DataLoader worker" not in res.output, res.output
    return res.output


def error_line(output: str) -> str:
    """The one `Error: ...` line of a failed command."""
    lines = [ln for ln in output.replace("\r", "\n").splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, output
    return lines[0]
