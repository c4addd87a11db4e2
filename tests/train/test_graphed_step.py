"""The graphed training step's bookkeeping, on CPU, with a stand-in for the CUDA graph.

A CUDA graph needs a GPU; what surrounds it does not: the split of the step into a device part
(what the graph replays) and host bookkeeping (Adam step counts, learning rate and bias
corrections from a device table indexed by step, dead-latent bound, the batch copied into the
graph's buffers). The stand-in records nothing at capture and runs the device part on replay,
through the Triton kernels in the interpreter, exactly as the fused eager step does; the graphed
run must then equal the eager fused run bitwise, also when AuxK steps run eagerly in between and
when the learning-rate table is refilled. On a GPU ``python -m sae.bench.gpu`` checks the real
capture against eager steps.
"""

from __future__ import annotations

import pytest
import torch

import sae.train.graphed as graphed_mod
from sae.buffer.synthetic import SyntheticConfig, SyntheticSource
from sae.models import SAEConfig, build_sae
from sae.train.config import TrainConfig
from sae.train.graphed import GraphedStep, graphable
from sae.train.trainer import Trainer


class ReplayedStep(GraphedStep):
    """Runs the device part on each replay instead of a captured graph."""

    replayed_steps: list[int] = []

    def _record(self) -> None:
        self.graph = "recorded"

    def _replay(self) -> None:
        self.replayed_steps.append(self.trainer.step)
        for p in self.params:
            p.grad = None  # a replay writes the gradients afresh, as the graph's backward does
        self.out = self._device_step(self.x, self.y)
        for p in self.params:
            p.grad = None  # after a real capture the .grad attributes are None: replays write the graph's own


@pytest.fixture
def replayed(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("SAE_KERNEL_BACKEND", "triton")  # interpreted on CPU (tests/conftest.py)
    monkeypatch.setattr(graphed_mod, "GraphedStep", ReplayedStep)
    monkeypatch.setattr(graphed_mod, "graphable", lambda trainer, sae: None if trainer.cfg.cuda_graphs else "off")


def run(tmp_path, graphs: bool, steps: int, dead_window: tuple[int, int] | None, source=None, **kw):
    sae = build_sae(SAEConfig(num_latents=96, k=4), 16, seed=0)
    cfg = TrainConfig(batch_size=32, steps=steps, device="cpu", out_dir=str(tmp_path), lr=3e-3, lr_warmup_steps=4,
                      progress=False, eval_every=0, final_report=False, log_every=3, cuda_graphs=graphs, **kw)
    trainer = Trainer(cfg, {"topk": sae}, source or SyntheticSource(SyntheticConfig(d=16, num_features=40), 32))

    def mark_dead(t):  # 5 latents dead after step a, alive again after step b: AuxK steps run eagerly
        if dead_window and t.step - 1 in dead_window:
            tracker = t.trackers["topk"]
            tracker.tokens_since_fired[:5] = tracker.threshold_tokens if t.step - 1 == dead_window[0] else 0
            tracker.refresh_bound()

    trainer.step_hooks.append(mark_dead)
    ReplayedStep.replayed_steps = []
    trainer.fit()
    params = {n: p.detach().clone() for n, p in trainer.saes["topk"].named_parameters()}
    return trainer, params, list(ReplayedStep.replayed_steps)


@pytest.mark.parametrize("dead_window", [None, (6, 9)], ids=["no_dead_latents", "auxk_steps_in_between"])
def test_graphed_steps_equal_eager_fused_steps(replayed, tmp_path, monkeypatch, dead_window):
    monkeypatch.setattr(ReplayedStep, "WINDOW", 4)  # refill the learning-rate table twice
    eager, eager_params, _ = run(tmp_path / "eager", False, 12, dead_window)
    graphed, graphed_params, replayed_steps = run(tmp_path / "graphed", True, 12, dead_window)
    assert eager.fused_step and graphed.fused_step
    eager_steps = set(range(7, 10)) if dead_window else set()
    # Steps 0 and 1 warm up through the graph's code eagerly; the capture comes at step 2.
    assert replayed_steps == [s for s in range(2, 12) if s not in eager_steps]
    for name, p in eager_params.items():
        assert torch.equal(graphed_params[name], p), name
    opt_e, opt_g = eager.optimizers["topk"], graphed.optimizers["topk"]
    for pe, pg in zip(eager.saes["topk"].parameters(), graphed.saes["topk"].parameters()):
        assert int(opt_g.state[pg]["step"]) == int(opt_e.state[pe]["step"]) == 12
        assert torch.equal(opt_g.state[pg]["exp_avg_sq"], opt_e.state[pe]["exp_avg_sq"])
    assert torch.equal(graphed.trackers["topk"].tokens_since_fired, eager.trackers["topk"].tokens_since_fired)
    assert graphed.last_metrics == eager.last_metrics


def test_a_resumed_run_warms_up_again_before_it_captures(replayed, tmp_path):
    """Warm-up counts calls in this process, not trainer steps: a run resumed from its step-4
    checkpoint runs steps 4 and 5 eagerly through the graph's code (compiling its kernels, which a
    capture must not do) and captures at step 6."""
    _, eager_params, _ = run(tmp_path / "eager", False, 10, None)

    def stop_after_6(t):
        if t.step == 6:
            raise KeyboardInterrupt

    sae = build_sae(SAEConfig(num_latents=96, k=4), 16, seed=0)
    cfg = TrainConfig(batch_size=32, steps=10, device="cpu", out_dir=str(tmp_path / "g"), lr=3e-3, lr_warmup_steps=4,
                      progress=False, eval_every=0, final_report=False, log_every=3, checkpoint_every=4)
    first = Trainer(cfg, {"topk": sae}, SyntheticSource(SyntheticConfig(d=16, num_features=40), 32))
    first.step_hooks.append(stop_after_6)
    ReplayedStep.replayed_steps = []
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert ReplayedStep.replayed_steps == list(range(2, 6))
    assert sorted(p.name for p in (tmp_path / "g" / "checkpoints").glob("step_*")) == ["step_00000004"]
    resumed, params, replayed_steps = run(tmp_path / "g", True, 10, None, checkpoint_every=4)
    assert replayed_steps == list(range(6, 10))
    for name, p in eager_params.items():
        assert torch.equal(params[name], p), name


class _Batches:
    """A finite source with batches of the given sizes (a buffer's or a live harvest's last batch
    can be short; so can the first of a tiny one)."""

    def __init__(self, x, sizes):
        self.x, self.sizes, self.d_in, self.d_out, self.i = x, sizes, x.shape[1], x.shape[1], 0

    def __iter__(self):
        from sae.buffer.source import Batch

        while self.i < len(self.sizes):
            start = sum(self.sizes[:self.i])
            self.i += 1
            yield Batch(self.x[start:start + self.sizes[self.i - 1]])

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_short_batches_run_eagerly(replayed, tmp_path):
    """The graph's buffers hold full batches: a short last batch runs eagerly, and a short first
    batch does not fix the graph's shape (the warm-up starts again on the first full batch)."""
    sizes = [16] + [32] * 5 + [16]
    x = torch.randn(sum(sizes), 16, generator=torch.Generator().manual_seed(1))
    eager, eager_params, _ = run(tmp_path / "eager", False, 7, None, source=_Batches(x, sizes))
    graphed, params, replayed_steps = run(tmp_path / "graphed", True, 7, None, source=_Batches(x, sizes))
    # Step 0 (16 rows) warms up, steps 1-2 warm up again on full batches, 3-5 replay, 6 (16 rows) eager.
    assert eager.step == graphed.step == 7 and replayed_steps == list(range(3, 6))
    assert graphed.graphed.graphs["topk"].x.shape[0] == 32
    for name, p in eager_params.items():
        assert torch.equal(params[name], p), name


def test_graphable_says_why_not(tmp_path):
    sae = build_sae(SAEConfig(num_latents=96, k=4), 16, seed=0)
    cfg = TrainConfig(batch_size=32, steps=1, device="cpu", out_dir=str(tmp_path), progress=False, eval_every=0,
                      final_report=False)
    trainer = Trainer(cfg, {"topk": sae}, SyntheticSource(SyntheticConfig(d=16), 32))
    assert graphable(trainer, sae) == "not on CUDA"
    batchtopk = build_sae(SAEConfig(architecture="batchtopk", num_latents=96, k=4), 16, seed=0)
    trainer.device = torch.device("cuda")  # pretend, to reach the other reasons
    trainer.fused_step = True
    assert "BatchTopKSAE" in graphable(trainer, batchtopk)
    trainer.cfg.cuda_graphs = False
    assert graphable(trainer, sae) == "train.cuda_graphs=false"
