"""One exception family for user and data errors.

The CLI catches `KdpipeError` once and prints it as one line naming the culprit (exit 1; `ConfigError`,
a wrong option or value, exits 2 like a usage error); `--debug` or KDPIPE_DEBUG=1 shows the traceback.
Anything else is a programming error and stays loud. Each class also keeps the builtin base it replaced
(ValueError, RuntimeError, FileNotFoundError ...), so library code that caught those still does.
"""
from __future__ import annotations


class KdpipeError(Exception):
    """A user or data error. str(e) is one line naming the file, shard, sample id, option or value at fault."""

    exit_code = 1


class ConfigError(KdpipeError, ValueError):
    """An option, argument or setting that cannot work; says which and what would."""

    exit_code = 2


class BusyError(KdpipeError, RuntimeError):
    """Another job holds the directory or store this one would write (an OS lock, freed when it exits)."""


class OutputExistsError(KdpipeError, FileExistsError):
    """The output already holds something this job must not overwrite."""


class DataError(KdpipeError):
    """Input data (tree, shards, index, manifest, teacher cache, checkpoint) missing, malformed or damaged."""


class OptionsMismatch(KdpipeError, ValueError):
    """A shard output directory made with different options or inputs than this run's (`kdpipe shard`); names
    what differs. Rerun with the same options, or with --overwrite to shard everything anew."""


class NonFiniteLossError(KdpipeError, FloatingPointError):
    """A training loss term became NaN or inf; names the global step, epoch, student and term, and the last good
    checkpoint."""


class MissingDataError(DataError, FileNotFoundError):
    """A file or directory the job needs is not there."""


class TreeLayoutError(DataError, ValueError):
    """An input image tree (ImageNet or class folders) laid out in a way `kdpipe shard` cannot read; names the
    folder or file and the layout it expected."""


class ShardFormatError(DataError, ValueError):
    """A shard directory's manifest, index or member is malformed, or names a path outside the directory."""


class RemoteReadError(DataError, OSError):
    """A file behind a URL (shard, manifest, index, teacher cache) could not be read whole after retries: the
    connection dropped or the server failed. Names the URL and the byte it stopped at."""


class CorruptSampleError(DataError, RuntimeError):
    """A sample that cannot be read, fails its checksum or cannot be decoded; names its split, shard and id."""


class CheckpointError(DataError, ValueError):
    """A checkpoint or weights file that is empty, truncated, unsafe (refused by weights-only loading) or
    not what the job needs."""


class RunFormatError(DataError, ValueError):
    """A run directory's config.json or metrics.jsonl is malformed, empty, or belongs to another run."""


class CacheError(DataError):
    """A teacher cache that cannot serve this job."""


class CacheMismatchError(CacheError, ValueError):
    """The cache was made for other data, views or teacher than the caller's; `.fields` names the differences."""

    def __init__(self, path: str, fields: list[str], details: list[str]):
        self.fields = fields
        super().__init__(f"teacher cache {path} does not match: " + "; ".join(details))


class IncompleteCacheError(CacheError, RuntimeError):
    """Some units of the cache were never written (an interrupted or still running cache-teacher job)."""

    def __init__(self, path: str, missing: dict[int, int], chunks_per_epoch: int):
        self.missing_epochs = sorted(missing)
        parts = [f"epoch {e} ({n}/{chunks_per_epoch} chunks missing)" for e, n in sorted(missing.items())]
        super().__init__(f"teacher cache {path} is incomplete: {', '.join(parts)}; "
                         f"rerun `kdpipe cache-teacher` with the same options to finish it")


class TeacherLogitsError(CacheError, ValueError):
    """Teacher logits a cache cannot store (non-finite, or beyond float16's range for full logits): the teacher
    diverged or its weights are damaged. Names the store and the unit; nothing of that unit is written."""


class CacheDamageError(CacheError, RuntimeError):
    """Written units whose data no longer match the checksums written with them (a lost chunk file, a flipped
    byte); `.units` lists their (epoch, chunk). A rerun of the same cache-teacher command recomputes them."""

    def __init__(self, path: str, damage: list[tuple[int, int, str]]):
        self.units = sorted({(e, c) for e, c, _ in damage})
        shown = "; ".join(f"epoch {e} chunk {c}: {why}" for e, c, why in damage[:5])
        more = f"; and {len(damage) - 5} more" if len(damage) > 5 else ""
        super().__init__(f"teacher cache {path} is damaged: {shown}{more}; rerun `kdpipe cache-teacher` with the "
                         f"same options to recompute the damaged units (`kdpipe verify --cache {path}` lists them all)")


def one_line(text: object, limit: int = 2000) -> str:
    """A message as one line (newlines and runs of spaces collapsed), cut at `limit` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
