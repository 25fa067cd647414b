"""kdpipe's messages: one `logging` hierarchy under the "kdpipe" logger, configured only by the CLI.

Each module takes `logger = get_logger(__name__)` ("kdpipe.pipeline.shards.writer", ...), so one switch sets the
level of all of kdpipe. `kdpipe` (trainer/cli.py) calls `configure`: INFO by default, DEBUG with -v, WARNING
with -q, each record as its bare message on stderr, as the print() calls it replaced showed it. Library code
configures nothing: a program that imports kdpipe sees warnings (Python's default) and chooses the rest, e.g.
`logging.basicConfig(level=logging.INFO)` or `configure()` (which also prints kdpipe's own warnings as one line).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

ROOT = "kdpipe"
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}  # -q, default, -v


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` under the "kdpipe" root (a module passes its __name__)."""
    return logging.getLogger(f"{ROOT}.{name}")


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a test runner or click's CliRunner swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102 - the current stderr, never a stale one
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure(verbosity: int = 0) -> logging.Logger:
    """Set kdpipe's level (-1 quiet: warnings and errors; 0: info; 1 verbose: debug) and its one stderr handler,
    message only. Calling it again replaces the handler, so a process that runs the CLI twice prints once."""
    root = logging.getLogger(ROOT)
    for handler in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(LEVELS[max(-1, min(1, verbosity))])
    warnings.showwarning = _show_warning
    return root


# kdpipe's own packages (pipeline/ and its sibling trainer/): their warnings are messages to the user
_OURS = tuple(str(Path(__file__).resolve().parents[2] / pkg) + os.sep for pkg in ("pipeline", "trainer"))
_python_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning kdpipe raises, as one `warning: ...` line through its logger (Python's format adds the file,
    line and source text, which say nothing to a user); other libraries' warnings keep Python's format."""
    if str(filename).startswith(_OURS):
        logging.getLogger(ROOT).warning(f"warning: {message}")
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def quiet() -> bool:
    """True when kdpipe's level was set above INFO (`kdpipe -q`): progress bars stay off too."""
    return logging.getLogger(ROOT).level > logging.INFO
