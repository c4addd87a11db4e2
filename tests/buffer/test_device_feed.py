"""DeviceFeed's staging path, run on the CPU through a stand-in for the CUDA primitives.

The stand-in keeps CUDA's asynchrony where it matters: an "upload" only queues the copy out of the
staging buffer, and the copy happens when its event is synchronised or the consumer waits for it.
So a staging buffer refilled before its copy completed would hand the trainer the wrong rows.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import pytest
import torch
from test_shard_reader import write_fake_buffer

from sae.buffer.device_feed import DeviceFeed
from sae.buffer.reader import ShardReader
from sae.buffer.tensor_source import TensorSource
from sae.models import SAEConfig, build_sae
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer


class _Stream:
    """Copies queued in order; an event completes every copy queued before it."""

    def __init__(self):
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.queued = 0
        self.lock = threading.Lock()

    def push(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        with self.lock:
            self.queued += 1
            self.pending.append((self.queued, src, dst))

    def flush(self, upto: float = float("inf")) -> None:
        with self.lock:
            for _, src, dst in [c for c in self.pending if c[0] <= upto]:
                dst.copy_(src)
            self.pending = [c for c in self.pending if c[0] > upto]


class _Event:
    def __init__(self, stream: _Stream):
        self.stream, self.seq, self.syncs = stream, stream.queued, 0

    def synchronize(self):
        self.syncs += 1
        self.stream.flush(self.seq)


class StagedOnCpu(DeviceFeed):
    """DeviceFeed with its device primitives replaced by CPU stand-ins: an upload only queues its
    copy, which runs when an event after it is synchronised (or, with ``consumer_waits``, when the
    consumer takes that batch). Without it the only copies before the end are those the producer
    itself waits for, so a staging buffer refilled before its copy ran yields wrong rows."""

    def __init__(self, *a, consumer_waits: bool = True, **k):
        super().__init__(*a, threaded=True, **k)
        self.allocated: list[str] = []
        self.events: list[_Event] = []
        self.consumer_waits = consumer_waits

    def _new_stream(self):
        self.stream = _Stream()
        return self.stream

    def _pinned(self, shape, dtype):
        self.allocated.append(sys._getframe(1).f_code.co_name)  # gather_into (the source's) or _to_device
        return torch.empty(shape, dtype=dtype)

    def _on(self, stream):
        return contextlib.nullcontext()

    def _record(self, stream):
        self.events.append(_Event(stream))
        return self.events[-1]

    def _upload(self, t):
        out = torch.full_like(t, float("nan"))
        self.stream.push(t, out)
        return out

    def _wait(self, item, event):
        if self.consumer_waits:
            event.stream.flush(event.seq)


def _batches(feed):
    """Every batch of ``feed`` taken without waiting for its copies; all copies run at the end."""
    got = [(b.x, b.y, state) for b, state, _ in feed]
    feed.stream.flush()
    return got


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_reader_gathers_straight_into_the_staging_buffers(tmp_path, dtype):
    write_fake_buffer(tmp_path, 1000, 96, dtype=dtype)

    def reader():
        return ShardReader(tmp_path, 50, hookpoint="a", target_hookpoint="b", epochs=1, heldout_shards=1)

    expected = [(b.x, b.y) for b in reader()]
    feed = StagedOnCpu(reader(), torch.device("cpu"), 2, consumer_waits=False)
    got = _batches(feed)
    assert len(got) == len(expected) == 960 // 50 + 1
    # Rows equal to the reader's own although nothing but the producer's waits ran the copies before
    # the end: each slot's previous copy completed before the reader refilled it.
    for (x, y, _), (ex, ey) in zip(got, expected):
        assert x.dtype == ex.dtype and torch.equal(x, ex) and torch.equal(y, ey)
    # Only the gather targets were ever allocated: one x and one y per ring slot (depth + 2 = 4),
    # plus the short last batch's; no batch was copied into a second staging buffer.
    assert feed.allocated == ["gather_into"] * (2 * 4 + 2), feed.allocated


def test_a_normalising_reader_and_a_plain_source_still_stage_exactly(tmp_path):
    write_fake_buffer(tmp_path, 1000, 96)
    norm = ShardReader(tmp_path, 64, hookpoint="a", epochs=1, heldout_shards=1, normalize="center_scale")
    expected = [b.x for b in ShardReader(tmp_path, 64, hookpoint="a", epochs=1, heldout_shards=1,
                                         normalize="center_scale")]
    feed = StagedOnCpu(norm, torch.device("cpu"), 2, consumer_waits=False)
    got = _batches(feed)
    assert feed.allocated == ["gather_into"] * 4  # converted to float32 straight into the staging buffers
    assert all(torch.equal(x, e) for (x, _, _), e in zip(got, expected)) and len(got) == len(expected)
    x = torch.randn(640, 8, generator=torch.Generator().manual_seed(0))
    plain = StagedOnCpu(TensorSource(x, batch_size=64, shuffle=False, epochs=1), torch.device("cpu"), 1,
                        consumer_waits=False)
    got = _batches(plain)
    assert torch.equal(torch.cat([b for b, _, _ in got]), x)
    assert plain.allocated == ["_to_device"] * 3  # copied into a ring of depth + 2 buffers, reused


def test_training_through_the_staged_feed_equals_the_plain_path(tmp_path, monkeypatch):
    write_fake_buffer(tmp_path / "buf", 2000, 96, dtype="bfloat16")

    def run(out):
        cfg = TrainConfig(batch_size=64, steps=25, out_dir=str(out), progress=False, eval_every=0, lr=1e-3,
                          checkpoint_every=0, final_report=False)
        src = ShardReader(tmp_path / "buf", 64, hookpoint="a", heldout_shards=1)
        t = Trainer(cfg, {"topk": build_sae(SAEConfig(num_latents=32, k=4), 6, seed=0)}, src)
        t.fit()
        return t.saes["topk"].state_dict()

    plain = run(tmp_path / "plain")
    import sae.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "DeviceFeed", lambda source, device, depth, threaded=None:
                        StagedOnCpu(source, device, depth))
    staged = run(tmp_path / "staged")
    for name, p in plain.items():
        assert torch.equal(staged[name], p), name
