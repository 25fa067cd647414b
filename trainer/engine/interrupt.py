"""A training run stopped by Ctrl-C or SIGTERM: the one line that tells the user where its last checkpoint is
and the command that continues it (printed by the CLI; click still ends a Ctrl-C with `Aborted!`, exit 1).

SIGTERM (a scheduler's preemption, `kill PID`) would end the process before Python could print anything; while
`sigterm_as_interrupt` is active it unwinds like Ctrl-C instead (so the same line is printed), and the CLI then
exits 143 as the signal would have. Loader workers still die of the signal when it is sent to the whole group.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from trainer.engine.rundir import RunDir


class TrainingInterrupted(KeyboardInterrupt):
    """KeyboardInterrupt raised by the epoch loop: `at` says where the run's last checkpoint is (None: none yet)."""

    def __init__(self, at: str | None):
        super().__init__(at or "no checkpoint yet")
        self.at = at


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt by `sigterm_as_interrupt`."""


def checkpoint_position(saved: tuple[int, int] | None, epochs: int, steps_per_epoch: int) -> str | None:
    """(epoch, step in epoch) of a checkpoint in words: 'the end of epoch 2/3' or 'epoch 3/3 step 4/6'."""
    if saved is None:
        return None
    epoch, step = saved
    if step == 0 and epoch > 0:
        return f"the end of epoch {epoch}/{epochs}"
    return f"epoch {epoch + 1}/{epochs} step {step}/{steps_per_epoch}"


def interrupted_line(out: str | Path, error: BaseException) -> str | None:
    """What to do after an interrupted `kdpipe train --out OUT`; None off rank 0 under torchrun (one line, not
    one per rank). `error`: the interrupt (a TrainingInterrupted knows the checkpoint's position)."""
    if os.environ.get("RANK", "0") != "0":
        return None
    run, cmd = RunDir(out), f"kdpipe train --out {out} --resume"
    if run.last.is_file():
        at = getattr(error, "at", None)
        where = f"{at} of {out}" if at else str(run.last)
        return f"interrupted: the last checkpoint is {where}; continue with: {cmd}"
    if run.config_path.is_file():
        return f"interrupted before the first checkpoint of {out}: `{cmd}` starts it again from the beginning"
    return f"interrupted before {out} held a run: nothing to continue; run the command again"


@dataclass
class SigtermState:
    received: bool = False


@contextmanager
def sigterm_as_interrupt() -> Iterator[SigtermState]:
    """Inside: SIGTERM to this process raises Terminated (state.received set); the old handler after. A no-op
    off the main thread (where Python cannot set handlers) and under torchrun (whose agent stops the ranks: one
    unwinding through collectives could hang until it kills it)."""
    state = SigtermState()
    if threading.current_thread() is not threading.main_thread() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield state
        return

    def handler(signum, frame):
        state.received = True
        # the process is ending: loader workers killed by the same signal (sent to the group) are no error to
        # report (torch's SIGCHLD handler would print one from the loader's __del__)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise Terminated("SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, old)
