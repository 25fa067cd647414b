"""Output directories a job may write: one it created, or one that carries its own marker.

Every writing job claims its --out here before it writes anything: a new or empty directory gets the job's
marker (a small JSON file, e.g. `.kdpipe-run`); a directory with that marker is the job's to continue or
rewrite; anything else (a user's directory, another job's output) is refused in one line naming the files
found, so kdpipe never replaces or deletes a file it did not write. An --out inside an input tree is refused
too (the next run would read its own output as input).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline.core.atomic import atomic_write_json
from pipeline.core.errors import ConfigError, OutputExistsError

# Files a job creates before it claims (its lock), or that a claim leaves behind: never "foreign".
NEUTRAL = (".kdpipe.lock",)
MARKERS = {".kdpipe-run": "a `kdpipe train` run", ".kdpipe-synth": "a `kdpipe synth` tree",
           ".kdpipe-report": "a `kdpipe report`", ".kdpipe-export": "a `kdpipe export` output",
           ".kdpipe-shard": "a `kdpipe shard` output", ".kdpipe-demo": "a `kdpipe demo` directory"}


def shown(path: str | Path) -> str:
    """A path as messages show it: relative to the working directory when it lies below it (paths are
    stored absolute; URLs and relative paths unchanged)."""
    text = str(path)
    if not os.path.isabs(text):
        return text
    rel = os.path.relpath(text)
    return rel if not rel.startswith("..") else text


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...]"


def read_marker(path: str | Path, marker: str) -> dict | None:
    """The record in path/marker ({} for a marker that is not a JSON object), or None without one."""
    file = Path(path) / marker
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        data = {}
    return data if isinstance(data, dict) else {}


def check_claimable(path: str | Path, marker: str, what: str, *, accept: Iterable[str] = (),
                    legacy: Callable[[Path], bool] = lambda path: False, flag: str = "--out") -> bool:
    """Whether `path` may be written by the job whose marker is `marker`: True if it already carries that
    marker (or one of `accept`), False if it is new or empty (the caller claims it). Otherwise an
    OutputExistsError naming the directory and what it holds. `legacy(path)`: True for an unmarked directory
    the job recognises as its own output of an older kdpipe version. Writes nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{flag} {shown(path)} is a file, not a directory; give a new or empty directory "
                                f"for {what}")
    if not path.is_dir():
        return False
    if any((path / m).exists() for m in (marker, *accept)):
        return True
    names = sorted(e.name for e in os.scandir(path) if e.name not in NEUTRAL and e.name != f".{marker}.tmp")
    if not names:
        return False
    if legacy(path):
        return True
    other = next((MARKERS[n] for n in names if n in MARKERS), None)
    listed = ", ".join(n for n in names[:4]) + (f" ... ({len(names)} entries)" if len(names) > 4 else "")
    held = f"is {other}" if other else f"holds files kdpipe did not write ({listed})"
    raise OutputExistsError(f"{flag} {shown(path)} {held}; kdpipe writes {what} only into a new or empty directory or "
                            f"its own earlier output, and never replaces files it did not write: choose another "
                            f"{flag}")


def claim_dir(path: str | Path, marker: str, what: str, *, record: dict | None = None,
              accept: Iterable[str] = (), legacy: Callable[[Path], bool] = lambda path: False,
              flag: str = "--out") -> dict | None:
    """Make `path` this job's output (see check_claimable), creating it and writing `marker` with `record`.

    A directory already marked with a different record (e.g. a synth tree made with other settings) is
    refused naming the differences. Returns the earlier record, or None for a new claim."""
    path = Path(path)
    accept = tuple(accept)
    mine = check_claimable(path, marker, what, accept=accept, legacy=legacy, flag=flag)
    old = read_marker(path, marker) if mine else None
    record = dict(record or {})
    if old is not None and record:
        diff = [f"{k}: {_short(old.get(k))} -> {_short(v)}" for k, v in record.items() if old.get(k) != v]
        if diff:
            shown_diff = "; ".join(diff[:4]) + (f"; ... ({len(diff)} settings)" if len(diff) > 4 else "")
            raise OutputExistsError(f"{flag} {shown(path)} holds {what} made with other settings ({shown_diff}); "
                                    f"choose another {flag} (or delete that directory)")
    if old is None or not (path / marker).exists():
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / marker, {"kind": what, **record})
    return old


def refuse_inside(out: str | Path, inputs: Iterable[tuple[str, str | Path | None]], flag: str = "--out") -> None:
    """ConfigError when `out` is, or lies inside, one of the input trees (flag, path): a job's output
    there becomes part of its own input (the rerun then reads it, or a shard run sees a class folder)."""
    real_out = os.path.realpath(out)
    for name, src in inputs:
        if src is None or "://" in str(src) or str(src).startswith("pipe:"):
            continue
        real_src = os.path.realpath(src)
        if os.path.commonpath([real_out, real_src]) == real_src:
            raise ConfigError(f"{flag} {shown(out)} lies inside {name} {shown(src)}: the output would become part "
                              f"of the input; choose an {flag} outside it")
