"""Processes: usable cores, workers that die with their parent, and a bounded ordered process map.

Shared by the shard writer (image preparation), the loader (worker counts) and the torch backend (workers).
"""
from __future__ import annotations

import os
import signal
import traceback
from itertools import chain, islice
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
WORKERS_PER_CORE = 4  # file reads can wait on a slow disk, so a little over one a core still helps


# ---------------------------------------------------------------------------------- process pool


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def workers_cap() -> int:
    """The most worker processes a pool starts: beyond a few per core they only cost memory (each is a fork)."""
    return WORKERS_PER_CORE * usable_cores()


def die_with_parent(parent_pid: int) -> None:
    """In a worker: exit when the parent dies (a kill -9 would otherwise orphan it forever, blocked
    on its pipe). Linux prctl(PR_SET_PDEATHSIG); elsewhere a no-op."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def watch_parent(parent_pid: int, every_s: float = 0.25) -> None:
    """In a worker: exit within `every_s` once the parent process is gone, polled from a daemon thread. For
    workers forked from a thread that may end before its process does: PR_SET_PDEATHSIG (die_with_parent)
    fires when the forking *thread* exits, and would kill a loader's workers under its feet."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="kdpipe-watch-parent").start()


class WorkerError(RuntimeError):
    """An exception raised inside an ordered_map worker, with its traceback text."""


def _worker_loop(fn: Callable, conn, parent_pid: int) -> None:
    """Receive chunks until None, send back fn(chunk) (or the exception's traceback)."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    while (task := conn.recv()) is not None:
        try:
            result = fn(task)
        except Exception:  # handed to the parent, which raises it
            result = WorkerError(traceback.format_exc())
        conn.send(result)


def ordered_map(fn: Callable[[list[T]], list[R]], items: Iterable[T], workers: int, chunk: int = 16,
                window: int = 4) -> Iterator[R]:
    """fn over chunks of items in `workers` processes, results in input order.

    Chunk j goes to worker j mod `workers` over its own pipe, so results come back in order with no
    helper threads (ProcessPoolExecutor's feeder and manager threads competed with the writer for the
    GIL: each task submission cost ~2 ms of waiting). At most workers*window chunks are in flight, so
    memory stays bounded however fast the workers are.
    """
    todo = _chunks(items, chunk)
    first = list(islice(todo, min(workers, workers_cap()) * window))
    workers = min(workers, workers_cap(), len(first))  # a process per chunk at most: `--workers 100000` forks few
    if workers <= 1:
        for c in chain(first, todo):
            yield from fn(c)
        return
    import multiprocessing as mp

    # fork (like torch's DataLoader on Linux): no re-import of __main__, works from scripts and stdin;
    # the children run only PIL and file reads.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    conns, procs = [], []
    finished = False
    try:
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_loop, args=(fn, child, os.getpid()), daemon=True)
            proc.start()
            child.close()
            conns.append(parent)
            procs.append(proc)
        sent = received = 0
        for c in first:
            conns[sent % workers].send(c)
            sent += 1
        while received < sent:
            try:
                result = conns[received % workers].recv()
            except EOFError:
                raise WorkerError(f"worker process {procs[received % workers].pid} died") from None
            received += 1
            for c in islice(todo, 1):
                conns[sent % workers].send(c)
                sent += 1
            if isinstance(result, WorkerError):
                raise result
            yield from result
        finished = True
    finally:
        for conn, proc in zip(conns, procs):
            if finished:
                conn.send(None)
                proc.join()
            else:  # stopped early (error, Ctrl-C, generator closed): a worker may be blocked sending
                proc.terminate()
                proc.join()
            conn.close()
