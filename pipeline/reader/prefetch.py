"""Batches made ahead, in a thread, on their own CUDA stream: data overlaps compute.

Without it the loader's CUDA work (nvJPEG decode, crops, resize, colour, normalisation, host->device copies)
runs in the training thread on the training stream, so the GPU alternates between making batch k+1 and training
on batch k, and the loader's Python competes with the step's for the same thread. `prefetch` runs the batch
iterator in a daemon thread under a side stream and hands each batch over with an event: the consumer's stream
waits for that event (a device-side wait, no host sync), and every tensor of the batch is marked as used by the
consumer's stream so the caching allocator cannot recycle its memory early (`Tensor.record_stream`).

On the CPU there are no streams: the same thread runs ahead by `depth` batches (useful when the iterator waits on
worker processes or I/O) and the batches are exactly the ones the iterator yields, in order. An exception in
the iterator is raised to the consumer as the same exception object, after the batches made before it.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [t for x in batch for t in _tensors(x)]
    if hasattr(batch, "__dict__"):  # Batch and other plain records
        return [t for x in vars(batch).values() for t in _tensors(x)]
    return []


def put_until_stopped(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """A producer thread's put: waits while `q` is full, gives up (False) once `stop` is set, so a consumer
    that went away never leaves the producer blocked forever."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def prefetch(batches: Iterable[Any], device: torch.device | str, depth: int = 2) -> Iterator[Any]:
    """`batches`, produced up to `depth` ahead in a background thread (on its own CUDA stream on a GPU).

    depth 0 returns the iterator itself (no thread). Closing the returned generator early stops the thread."""
    device = torch.device(device)
    if depth <= 0:
        return iter(batches)
    return _prefetched(iter(batches), device, depth)


def _prefetched(it: Iterator[Any], device: torch.device, depth: int) -> Iterator[Any]:
    cuda = device.type == "cuda"
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    stream = torch.cuda.Stream(device) if cuda else None

    def put(item: Any) -> bool:
        return put_until_stopped(slots, item, stop)

    def produce() -> None:
        try:
            with torch.cuda.stream(stream) if cuda else nullcontext():
                for batch in it:
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not put((batch, event)):
                        return
            put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failed(e))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - an iterator failing to close must not hide the real outcome
                    pass

    thread = threading.Thread(target=produce, name="kdpipe-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            batch, event = item
            if event is not None:
                consumer = torch.cuda.current_stream(device)
                consumer.wait_event(event)
                for t in _tensors(batch):
                    if t.device.type == "cuda":
                        t.record_stream(consumer)
            yield batch
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting to put, then let it finish its current batch
            try:
                slots.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()
