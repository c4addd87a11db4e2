"""In-memory activations: TensorSource, and tensors handed to the Trainer directly.

Batches cover each epoch once in a seeded order, ranks split them evenly, the position resumes
exactly (a checkpointed run equals an uninterrupted one bitwise), the identity changes with the
data, and bad inputs are clear errors. Also the default LR warm-up rule.
"""

from __future__ import annotations

import pytest
import torch

from sae.buffer.tensor_source import TensorSource
from sae.models import SAEConfig, build_sae
from sae.train.config import TrainConfig
from sae.train.schedule import lr_factor, warmup_steps
from sae.train.trainer import Trainer


def test_epochs_ranks_and_resume():
    x = torch.arange(40.0).reshape(20, 2)
    whole = TensorSource(x, batch_size=4, epochs=2)
    rows = [b.x[:, 0].tolist() for b in whole]
    assert len(rows) == 10 and sorted(v for r in rows[:5] for v in r) == [float(2 * i) for i in range(20)]
    assert rows[:5] != rows[5:]  # a new order each epoch
    ranks = [[b.x[:, 0].tolist() for b in TensorSource(x, batch_size=4, epochs=1, rank=r, world_size=2)]
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2 and ranks[0] + ranks[1] != rows[:4]
    assert {tuple(r) for r in ranks[0] + ranks[1]} == {tuple(r) for r in (rows[0], rows[1], rows[2], rows[3])}
    src = TensorSource(x, batch_size=4)
    it = iter(src)
    for _ in range(7):
        next(it)
    again = TensorSource(x, batch_size=4)
    again.load_state_dict(src.state_dict())
    assert torch.equal(next(iter(again)).x, next(it).x)


def test_trainer_takes_tensors_and_resumes_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)

    def trainer(out, steps):
        cfg = TrainConfig(batch_size=128, steps=steps, out_dir=str(out), checkpoint_every=5, progress=False,
                          eval_every=0, lr=1e-3)
        return Trainer(cfg, {"topk": build_sae(SAEConfig(num_latents=64, k=4), 16, seed=0)}, x)

    straight = trainer(tmp_path / "a", 20)
    straight.fit()
    killed = trainer(tmp_path / "b", 20)

    def kill(t):
        if t.step == 12:  # two steps after the checkpoint at 10
            raise KeyboardInterrupt

    killed.step_hooks.append(kill)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = trainer(tmp_path / "b", 20)
    resumed.fit()
    assert resumed.step == 20
    for name, p in straight.saes["topk"].state_dict().items():
        assert torch.equal(resumed.saes["topk"].state_dict()[name], p), name
    other = Trainer(TrainConfig(batch_size=128, steps=30, out_dir=str(tmp_path / "b"), progress=False),
                    {"topk": build_sae(SAEConfig(num_latents=64, k=4), 16, seed=0)}, x + 1)
    with pytest.raises(ValueError, match=r"data\.x: .* -> "):
        other.fit()  # other activations: another run


def test_transcoder_pair_and_bad_inputs():
    x, y = torch.randn(64, 8), torch.randn(64, 6)
    t = Trainer(TrainConfig(batch_size=16, steps=1, progress=False),
                {"tc": build_sae(SAEConfig(num_latents=32, k=4, transcode=True), 8, 6)}, (x, y))
    assert t.source.d_in == 8 and t.source.d_out == 6
    with pytest.raises(TypeError, match="a tensor \\[rows, d\\], an \\(x, y\\) pair of tensors"):
        Trainer(TrainConfig(batch_size=16, steps=1), {"s": build_sae(SAEConfig(num_latents=32, k=4), 8)},
                [x[0], x[1]])
    with pytest.raises(ValueError, match="y has 10 rows but x has 64"):
        TensorSource(x, y[:10])
    with pytest.raises(ValueError, match="64 rows are fewer than one batch of 128"):
        TensorSource(x, batch_size=128)


def test_default_warmup_scales_with_the_run():
    cfg = TrainConfig()
    assert cfg.lr_warmup_steps is None
    assert [warmup_steps(n, cfg) for n in (10, 132, 2_000, 100_000)] == [0, 7, 100, 1000]
    assert lr_factor(0, 132, cfg) == pytest.approx(1 / 7) and lr_factor(7, 132, cfg) == 1.0
    assert warmup_steps(132, TrainConfig(lr_warmup_steps=50)) == 50


@pytest.mark.parametrize("source", ["tensor", "synthetic"])
def test_batches_read_ahead_by_a_device_feed_resume_exactly(tmp_path, source):
    """With a DeviceFeed thread reading batches ahead (on CPU here, as on a GPU), a checkpoint holds
    the position after the last batch trained on, not after the batches still in flight."""
    from sae.buffer.synthetic import SyntheticConfig, SyntheticSource

    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))

    def trainer(out, threaded):
        src = x if source == "tensor" else SyntheticSource(SyntheticConfig(d=16), 128)
        cfg = TrainConfig(batch_size=128, steps=20, out_dir=str(out), checkpoint_every=5, progress=False,
                          eval_every=0, lr=1e-3, prefetch_to_device=3)
        t = Trainer(cfg, {"topk": build_sae(SAEConfig(num_latents=64, k=4), 16, seed=0)}, src)
        t.feed_threaded = threaded
        return t

    straight = trainer(tmp_path / "a", threaded=False)
    straight.fit()
    killed = trainer(tmp_path / "b", threaded=True)
    killed.step_hooks.append(lambda t: (_ for _ in ()).throw(KeyboardInterrupt) if t.step == 12 else None)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = trainer(tmp_path / "b", threaded=True)
    resumed.fit()
    for name, p in straight.saes["topk"].state_dict().items():
        assert torch.equal(resumed.saes["topk"].state_dict()[name], p), name


def test_a_feed_that_cannot_stage_falls_back_without_losing_a_batch(tmp_path, caplog):
    """If staging onto the device fails (a driver without pinned memory, say), the batch it held is
    still trained on, the rest move in the training thread, and a warning says so."""
    from sae.buffer.device_feed import DeviceFeed

    class Broken(DeviceFeed):
        def _stage(self, item, bufs, last, stream):
            raise RuntimeError("no pinned memory here")

    x = torch.arange(64 * 4, dtype=torch.float32).reshape(64, 4)
    src = TensorSource(x, batch_size=8, shuffle=False, epochs=1)
    with caplog.at_level("WARNING"):
        got = [(b.x[0, 0].item(), state) for b, state, _ in Broken(src, torch.device("cpu"), 2, threaded=True)]
    assert [v for v, _ in got] == [float(8 * 4 * i) for i in range(8)]  # every batch, in order
    assert all(state is None for _, state in got[1:]) and "no pinned memory here" in caplog.text
