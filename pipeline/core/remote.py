"""Shard directories (and teacher caches) behind a URL: what counts as a URL, safe member names, and byte
streams that survive a dropped connection.

A shard directory URL is an fsspec URL (`http(s)://`, `s3://`, `gs://`, `file://`, ...) or a webdataset `pipe:`
command with `{name}` where the file name goes (`pipe:aws s3 cp s3://bucket/in100/{name} -`). http(s) is read
with the standard library (no aiohttp needed), `pipe:` through webdataset's gopen, everything else through
fsspec (s3:// needs s3fs, gs:// gcsfs). `open_stream` returns a reader that knows how many bytes the file
must have: a read that fails, or ends early, is resumed at the same byte (a Range request, a seek, or for
pipes and servers without Range support a re-read that skips what was read). A connection that keeps dropping
but delivers more bytes each time goes on; `retries` failures in a row without a byte of progress raise
`RemoteReadError` naming the URL and the byte. A stream is never silently short.
"""
from __future__ import annotations

import http.client
import re
import shlex
import time
import urllib.error
import urllib.request
from typing import IO, Callable, TypeVar

from pipeline.core.errors import ConfigError, MissingDataError, RemoteReadError
from pipeline.core.names import check_shard_name

URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
RETRIES = 3  # re-opens of one file after a failed or short read
TIMEOUT_S = 60.0  # per connect / per read on http(s)
# What a dropped or refused connection raises, by transport (urllib, http.client, sockets, pipes).
TRANSIENT = (OSError, http.client.HTTPException, urllib.error.URLError)
T = TypeVar("T")


def is_url(shards: object) -> bool:
    """True for a URL string or a `pipe:` spec; a local path (str or Path) is not one."""
    return isinstance(shards, str) and (shards.startswith("pipe:") or bool(URL_RE.match(shards)))


def member_url(base: str, name: str) -> str:
    """URL of file `name` of the shard directory at `base` (for `pipe:`, the command with {name} filled in).

    `name` must pass `pipeline.core.names.check_shard_name` (ShardFormatError otherwise), so it holds no character a
    shell or a URL gives a meaning to, whatever quotes the user's command puts around {name}; it is also
    shell-quoted, which leaves such a name unchanged."""
    check_shard_name(name, f"{base}: a file of the shard directory")
    if base.startswith("pipe:"):
        if "{name}" not in base:
            raise ConfigError(f"{base!r}: a pipe: shard source needs {{name}} where the file name goes, e.g. "
                              f"'pipe:aws s3 cp s3://bucket/shards/{{name}} -'")
        return base.replace("{name}", shlex.quote(name))
    return base.rstrip("/") + "/" + name


def _open_http(url: str, start: int) -> IO[bytes]:
    req = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code in (403, 404, 410):
            raise MissingDataError(f"{url}: HTTP {e.code} {e.reason}") from None
        raise
    if start and resp.status != 206:  # the server ignored the Range header: skip to `start` ourselves
        _skip(resp, start)
    return resp


def _open_pipe(url: str, start: int) -> IO[bytes]:
    from webdataset.gopen import gopen

    f = gopen(url, "rb")
    _skip(f, start)
    return f


def _open_fsspec(url: str, start: int) -> IO[bytes]:
    import fsspec

    try:
        f = fsspec.open(url, "rb").open()
    except ImportError as e:  # s3:// without s3fs and the like: say which package
        raise ConfigError(f"{url}: {e}") from None
    except FileNotFoundError:
        raise MissingDataError(f"{url}: not found") from None
    if start:
        f.seek(start)
    return f


def _skip(f: IO[bytes], n: int) -> None:
    while n > 0:
        got = f.read(min(n, 1 << 20))
        if not got:
            raise OSError(f"stream ended {n} bytes before the resume point")
        n -= len(got)


def opener(url: str) -> Callable[[str, int], IO[bytes]]:
    """The function that opens `url` at a byte offset, by scheme."""
    if url.startswith("pipe:"):
        return _open_pipe
    if url.startswith(("http://", "https://")):
        return _open_http
    return _open_fsspec


def with_retries(attempt: Callable[[], T], retries: int, give_up: Callable[[BaseException], Exception], *,
                 transient: tuple[type[BaseException], ...] = TRANSIENT,
                 on_retry: Callable[[], None] = lambda: None) -> T:
    """The one retry loop of remote reads: attempt() until it returns. A `transient` failure is retried after a
    short backoff (0.2 s, 0.4 s, ... at most 2 s), at most `retries` times, then give_up(the last error) is
    raised (the RemoteReadError naming the URL); MissingDataError and ConfigError are final."""
    failures = 0
    while True:
        try:
            return attempt()
        except (MissingDataError, ConfigError):
            raise
        except transient as e:
            err: BaseException = e
        failures += 1
        if failures > retries:
            raise give_up(err) from None
        on_retry()
        time.sleep(min(2.0, 0.1 * 2 ** failures))


class RetryingStream:
    """A binary reader of one remote file of known size that resumes after a failed or early-ended read.

    `read(n)` returns b"" only at the file's true end; a connection that drops (an error, or EOF before `size`
    bytes) is re-opened at the current byte, with a short backoff; `retries` failures in a row without progress
    raise RemoteReadError."""

    def __init__(self, url: str, size: int, start: int = 0, retries: int = RETRIES):
        self.url, self.size, self.pos, self.retries = url, int(size), int(start), retries
        self.reopened = 0  # how many times this stream was resumed (tests and logs look at it)
        self._open = opener(url)
        self._f: IO[bytes] | None = None

    def __str__(self) -> str:  # webdataset appends str(stream) to its error messages
        return self.url

    def read(self, n: int = -1) -> bytes:
        want = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if want <= 0:
            return b""
        return with_retries(lambda: self._read_once(want), self.retries, self._give_up,
                            transient=(EOFError, *TRANSIENT), on_retry=self._reopen)

    def _read_once(self, want: int) -> bytes:
        """One read of up to `want` bytes, opening the file at the current byte when needed; a failed or empty
        read drops the connection and raises (an early end is an EOFError)."""
        try:
            if self._f is None:
                self._f = self._open(self.url, self.pos)
            data = self._f.read(want)
            if not data:
                raise EOFError(f"ended after {self.pos} of {self.size} bytes")
        except (EOFError, *TRANSIENT):
            self._drop()
            raise
        self.pos += len(data)
        return data

    def _give_up(self, err: BaseException) -> RemoteReadError:
        return RemoteReadError(f"{self.url}: read failed at byte {self.pos} of {self.size} after "
                               f"{self.retries} retries ({type(err).__name__}: {err}); check the "
                               f"storage or network and rerun")

    def _reopen(self) -> None:
        self.reopened += 1

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # closing a broken connection or a failed pipe: nothing left to save
                pass

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "RetryingStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_whole(url: str, retries: int = RETRIES) -> bytes:
    """A small file (manifest, index) in full: retried like a stream, but its size is whatever arrives."""
    def once() -> bytes:
        f = opener(url)(url, 0)
        try:
            return f.read()
        finally:
            f.close()

    return with_retries(once, retries, lambda e: RemoteReadError(
        f"{url}: could not be read after {retries} retries ({type(e).__name__}: {e})"))
