"""Run a batch generator in a background thread, a bounded number of items ahead.

Used by the shard reader and the live source so that reading, gathering and normalising (or
harvesting) overlap with the training step. Errors in the producer are re-raised in the
consumer; closing the consumer stops the producer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetched(make: Callable[[], Iterator[T]], depth: int) -> Iterator[T]:
    """Yield the items of ``make()``, produced by a daemon thread up to ``depth`` items ahead.

    ``depth <= 0`` runs ``make()`` in the caller's thread.
    """
    if depth <= 0:
        yield from make()
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in make():
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(e))

    thread = threading.Thread(target=produce, name="sae-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join(timeout=60)
