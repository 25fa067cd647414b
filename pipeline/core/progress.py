"""One progress display for every long job (synth, shard, verify, cache-teacher, the trainer's epochs).

On a terminal (stderr is a TTY) it is a tqdm bar, as before. Anywhere else (a log file, a pipe, a test runner)
a bar's carriage-return redraws would all land in the file, so there is none: at most one plain line every
PLAIN_EVERY_S seconds through the "kdpipe" logger (`shard train: 1200/5000 img (24 %)`), and a last one at the
end when any was shown, so a long job's log shows it moving and a short one's shows nothing. `kdpipe -q`
(pipeline/core/log.py) turns both off. The trainer's own per-epoch line (trainer/engine/loop.py) takes the
same terminal decision, `show_bar`.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator

from pipeline.core.log import get_logger, quiet

logger = get_logger(__name__)

PLAIN_EVERY_S = 60.0  # off a terminal: the least time between two plain progress lines


def is_terminal(stream: Any = None) -> bool:
    """True when `stream` (default: the current sys.stderr) is a terminal that can redraw a bar in place."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def show_bar(enabled: bool = True) -> bool:
    """Whether a redrawn bar is wanted: the caller wants progress, stderr is a terminal and kdpipe is not -q."""
    return enabled and is_terminal() and not quiet()


class PlainProgress:
    """tqdm's small surface (iterate, update, set_postfix_str, close, `with`) as rare plain log lines."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, initial: int,
                 enabled: bool):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.enabled, self.postfix = initial, enabled, ""
        self._last, self._shown = time.monotonic(), None  # the count last shown; None: no line yet

    def __iter__(self) -> Iterator:
        for x in self.iterable:
            yield x
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.enabled and now - self._last >= PLAIN_EVERY_S:
            self._last = now
            self._show()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def line(self) -> str:
        """`desc: n/total unit (p %)`, the postfix after a comma when there is one."""
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f} %)" if self.total \
            else f"{self.n} {self.unit}"
        return f"{self.desc}: {done}" + (f", {self.postfix}" if self.postfix else "")

    def _show(self) -> None:
        self._shown = self.n
        logger.info(self.line())

    def close(self) -> None:
        if self.enabled and self._shown is not None and self._shown != self.n:
            self._show()  # the end of a job whose log showed it moving
        self.enabled = False

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, initial: int = 0, **tqdm_options: Any) -> Any:
    """Progress over `iterable` (wrap it) or by hand (`.update(n)`, `.close()` or `with`): a tqdm bar when
    `show_bar(enabled)`, else a PlainProgress (silent when not enabled or under -q; see the module doc).
    tqdm_options (dynamic_ncols, smoothing, leave, ...) apply to the bar only."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if show_bar(enabled):
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, **tqdm_options)
    return PlainProgress(iterable, total, desc, unit, initial, enabled and not quiet())
