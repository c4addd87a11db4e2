"""Batches of an ActivationSource moved onto the training device ahead of use.

On CUDA a thread takes each batch from the source, its rows in a pinned staging buffer (a small
ring: a buffer is refilled only after the copy out of it has completed; a source with
``iter_into``, the ShardReader or LiveSource, gathers the rows straight into it, others' batches
are copied in), starts the copy to the GPU on a side stream and records an event; the training
stream waits on that event on the device, never on the host. Reading shards, gathering rows,
staging and the host-to-device copy so overlap the steps before. Elsewhere the batches pass through
in the caller's thread.

The source runs ahead of the trainer, so its own ``state_dict`` would describe batches not yet
trained on: the feed snapshots it right after taking each batch and hands the snapshot over with
that batch, and the trainer checkpoints the snapshot of the last batch it consumed. A resume then
starts at the first batch it never trained on, exactly as without the feed.

Sits between ``sae.buffer`` (sources) and ``sae.train`` (the trainer); shape legend: B rows.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from sae.prefetch import prefetched

from .source import Batch

log = logging.getLogger(__name__)

Item = Batch | dict[str, Batch]


class DeviceFeed:
    """Iterate ``(batch on the device, source state after it, ready event or None)``.

    Args:
        source: the ActivationSource (batches, or ``{hook point: Batch}``).
        device: the training device.
        depth: batches staged ahead (0: no thread; batches move in the caller's thread).
        threaded: run the thread on a CPU device too (tests of the hand-over; no pinning there).
    """

    def __init__(self, source: Any, device: torch.device, depth: int = 2, *, threaded: bool | None = None):
        self.source, self.device, self.depth = source, device, depth
        self.threaded = (device.type == "cuda") if threaded is None else threaded

    def __iter__(self) -> Iterator[tuple[Item, dict[str, Any] | None, Any]]:
        if not self.threaded or self.depth <= 0:
            for item in self.source:
                yield item, None, None
            return
        stream = self._new_stream()
        for item, state, event in prefetched(lambda: self._stage_all(stream), self.depth):
            if isinstance(event, Exception):  # staging failed (first batch): plain copies from here on
                log.warning("staging batches onto %s failed (%s: %s); moving them in the training thread instead",
                            self.device, type(event).__name__, event)
                yield _map(item, lambda name, t: None if t is None else t.to(self.device)), None, None
                for rest in self.source:
                    yield rest, None, None
                return
            if event is not None:
                self._wait(item, event)
            yield item, state, event

    def _stage_all(self, stream) -> Iterator[tuple[Item, dict[str, Any], Any]]:
        ring = self.depth + 2  # pinned buffer sets; one is refilled only after its copies completed
        slots: list[dict[str, Tensor]] = [{} for _ in range(ring)]
        events: list[Any] = [None] * ring
        taken = 0  # batches taken from the source so far: the next one is staged in slot taken % ring

        def gather_into(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
            """The pinned buffer the source gathers the next batch's rows into (no host copy after)."""
            s = taken % ring
            if events[s] is not None:
                events[s].synchronize()  # the previous copy out of this slot has completed
                events[s] = None
            key = f"gather.{name}"
            buf = slots[s].get(key)
            if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
                buf = slots[s][key] = self._pinned(shape, dtype)
            return buf

        # Sources that can gather into given tensors (ShardReader, LiveSource) fill the pinned
        # buffers directly on CUDA; others' batches are copied into them.
        gathers = stream is not None and hasattr(self.source, "iter_into")
        for item in self.source.iter_into(gather_into) if gathers else self.source:
            state = copy.deepcopy(self.source.state_dict())
            s = taken % ring
            taken += 1
            try:
                moved, event = self._stage(item, slots[s], events[s], stream)
            except Exception as e:  # noqa: BLE001 - handed over with the batch, which is not lost
                yield item, state, e
                return
            events[s] = event
            yield moved, state, event

    def _stage(self, item: Item, bufs: dict[str, Tensor], last: Any, stream) -> tuple[Item, Any]:
        """``item`` copied to the device through the pinned buffers ``bufs`` (after ``last``, the event
        of their previous copies), and the event of these copies; on a CPU, ``item`` unchanged."""
        if stream is None:
            return item, None
        if last is not None:
            last.synchronize()
        with self._on(stream):
            moved = _map(item, lambda name, t: self._to_device(bufs, name, t))
            event = self._record(stream)
        return moved, event

    def _to_device(self, bufs: dict[str, Tensor], name: str, t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        if t.device.type != "cpu":
            return self._upload(t)
        gathered = bufs.get(f"gather.{name}")
        if gathered is not None and t.data_ptr() == gathered.data_ptr() and t.shape == gathered.shape:
            return self._upload(t)  # the source gathered straight into pinned memory: no host copy
        buf = bufs.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = bufs[name] = self._pinned(t.shape, t.dtype)
        buf.copy_(t)
        return self._upload(buf)

    # Device primitives, in one place (a CPU stand-in overrides them in the tests).
    def _new_stream(self) -> Any:
        return torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def _pinned(self, shape, dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _on(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    def _record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _upload(self, t: Tensor) -> Tensor:
        return t.to(self.device, non_blocking=True)

    def _wait(self, item: Item, event: Any) -> None:
        """The training stream waits (on the device) for ``item``'s copies."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in _tensors(item):
            t.record_stream(current)  # allocated on the copy stream, used on this one


def _map(item: Item, fn, prefix: str = "") -> Item:
    """``fn(name, tensor)`` applied to every tensor of a batch (or of each hook point's batch)."""
    if isinstance(item, dict):
        return {k: _map(v, fn, f"{k}.") for k, v in item.items()}
    return Batch(fn(f"{prefix}x", item.x), fn(f"{prefix}y", item.y))


def _tensors(item: Item) -> Iterator[Tensor]:
    for b in item.values() if isinstance(item, dict) else [item]:
        yield b.x
        if b.y is not None:
            yield b.y
