"""What a training run read, identified by content: recorded once in RUN/config.json (runtime.inputs) and in
every checkpoint, and checked by every later reader (`train --resume`, `eval --run`, `report`).

A record names each input by its absolute path (URLs as given) and a sha256: the shard manifest's (which
covers every shard and index file by their own sha256), the teacher cache fingerprint's, the teacher weights
file's. A reader that finds other content under a recorded path, or is given another input, refuses in one
line naming both.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from pipeline.core.digest import bytes_sha256
from pipeline.core.errors import ConfigError
from pipeline.core.outdir import shown
from pipeline.core.remote import is_url

# input name -> (the flag that gives it, the record's hash field, what the hash is of)
INPUTS = {"shards": ("--shards", "manifest_sha256", "manifest sha256"),
          "teacher_cache": ("--teacher-cache", "fingerprint_sha256", "fingerprint sha256"),
          "teacher_weights": ("--teacher-weights", "sha256", "file sha256")}
NOUNS = {"shards": "shards", "teacher_cache": "teacher cache", "teacher_weights": "teacher weights"}


def absolute(path: str | None) -> str | None:
    """A local path made absolute (stored so: a run read from another directory finds the same files);
    URLs, pipe: specs and None unchanged."""
    if not path or is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def absolute_paths(cfg: Any) -> Any:
    """cfg (TrainConfig) with shards, out, teacher weights and cache as absolute paths."""
    return dataclasses.replace(cfg, shards=absolute(cfg.shards), out=absolute(cfg.out),
                               teacher_weights=absolute(cfg.teacher_weights),
                               teacher_cache=absolute(cfg.teacher_cache))


def fingerprint_sha256(fingerprint: dict) -> str:
    """sha256 of a teacher cache fingerprint (canonical JSON): what a run records of the cache it used."""
    return bytes_sha256(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode())


def input_record(*, shards: str, manifest_sha256: str, teacher_cache: str | None = None,
                 cache_fingerprint: dict | None = None, teacher_weights: str | None = None) -> dict:
    """The runtime.inputs section of a run: {name: {"path": ..., <hash field>: ...}} for each input it read."""
    from trainer.engine.runtime import file_sha256

    out = {"shards": {"path": absolute(shards), "manifest_sha256": manifest_sha256}}
    if teacher_cache and cache_fingerprint is not None:
        out["teacher_cache"] = {"path": absolute(teacher_cache),
                                "fingerprint_sha256": fingerprint_sha256(cache_fingerprint)}
    if teacher_weights:
        out["teacher_weights"] = {"path": absolute(teacher_weights), "sha256": file_sha256(teacher_weights)}
    return out


def recorded_inputs(run_config: dict | None) -> dict:
    """The inputs a run recorded (empty for runs of older kdpipe versions, which recorded none)."""
    inputs = ((run_config or {}).get("runtime") or {}).get("inputs")
    return inputs if isinstance(inputs, dict) else {}


def check_inputs(recorded: dict, now: dict, where: str | Path, fix: str, *, given: Collection[str] | None = None,
                 changed_fix: str | None = None) -> None:
    """ConfigError naming the first input of `now` whose content differs from `recorded` (or that the run did
    not use, or lacks): the flag, both hashes (short), the recorded path and the file holding the record.

    `given`: the inputs the user named on this command line (None: all). One not given is the run's own input
    that changed under its recorded path, so it is named as that (no flag was given to blame), with
    `changed_fix` (default `fix`)."""
    for name, (flag, field, what) in INPUTS.items():
        was, got = recorded.get(name), now.get(name)
        if was is None and got is None:
            continue
        if was is None or got is None:
            used = f"the run used {flag} {shown(was['path'])}" if was else f"the run used no {flag}"
            given = f"{flag} {shown(got['path'])} given" if got else f"no {flag} now"
            raise ConfigError(f"{given}, but {used} (recorded in {shown(where)}); {fix}")
        if was.get(field) != got.get(field) and given is not None and name not in given:
            raise ConfigError(f"the run's {NOUNS[name]} {shown(got['path'])}: {what} {str(got.get(field))[:12]}.. "
                              f"differs from the {str(was.get(field))[:12]}.. recorded in {shown(where)}: it changed "
                              f"since the run read it; {changed_fix or fix}")
        if was.get(field) != got.get(field):
            raise ConfigError(f"{flag} {shown(got['path'])}: {what} {str(got.get(field))[:12]}.. differs from the "
                              f"run's {str(was.get(field))[:12]}.. ({shown(was['path'])}, recorded in "
                              f"{shown(where)}); {fix}")
