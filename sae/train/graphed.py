"""A TopK SAE's whole training step captured once as a CUDA graph and replayed.

At small widths a step is a few dozen short kernels and the host's launch overhead dominates
(768 x 24576 on an H200: 2.0 ms of kernels, 3.4 ms per step eagerly). Replaying a captured graph
costs one launch. What the graph holds: the forward (selection GEMM, top-k, fused autoencode and
loss), the backward, the fused optimiser step (:class:`sae.train.optim.SAEAdam`), the dead-latent
counters and the NaN/Inf flag of the batch; everything reads fixed addresses, so each step copies
its batch into the graph's input buffer and replays.

What stays on the host, per replay: the trainer's step and token counts, each parameter's Adam
step count, the learning-rate scheduler and the dead-latent bound. The learning rate and Adam's
bias corrections of every future step are precomputed into a device table the graph indexes with
its own step counter, so no value is copied from host to device per step. A graph replay runs the
same kernels with the same arguments as the eager fused step, so the two are bitwise equal
(checked on the GPU by ``python -m sae.bench.gpu``).

The first two calls in a process run the graph's code eagerly (compiling, loading and autotuning
its kernels, which a capture forbids); a batch of another shape (a short last batch) and steps
with dead latents (AuxK's count of dead latents is data-dependent) run eagerly on the same
tensors. A step is graphed only when it can be: CUDA, the fused step, one process per SAE (no
collectives), no gradient accumulation or autocast, the plain TopK family (BatchTopK reads the
device to pick its batch threshold). ``train.cuda_graphs=false`` turns it off.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from sae.models.topk import TopKSAE

from .optim import SAEAdam

log = logging.getLogger(__name__)


def graphable(trainer, sae) -> str | None:
    """None when ``sae``'s steps can be captured, else why not."""
    cfg = trainer.cfg
    reasons = [
        (trainer.device.type == "cuda", "not on CUDA"),
        (cfg.cuda_graphs, "train.cuda_graphs=false"),
        (trainer.fused_step, "not the fused optimiser step"),
        (type(sae) is TopKSAE, f"{type(sae).__name__} is not the plain TopK family"),
        (cfg.grad_accum_steps == 1, "gradient accumulation"),
        (cfg.mixed_precision == "no", "autocast"),
        (trainer.strategy.name in ("none", "sae"), f"strategy {trainer.strategy.name!r} communicates in the step"),
        (trainer.hookpoints is None or trainer.strategy.name == "sae" or len(trainer.saes) == 1,
         "several hook points in one process"),
    ]
    for ok, why in reasons:
        if not ok:
            return why
    return None


class GraphedStep:
    """Warms up, then captures one SAE's step, and replays it on later calls.

    The first :attr:`WARMUP` calls run the graph's own code eagerly, as real training steps: that
    compiles, loads and autotunes every kernel the graph will launch (the optimiser kernels that
    read the device table exist only here), none of which may happen during a capture. Counted per
    process, so a resumed run warms up again before it captures."""

    #: Eager calls through the device step before the capture.
    WARMUP = 2
    #: Steps covered by the device table of learning rates and bias corrections before a refill.
    WINDOW = 4096

    def __init__(self, trainer, name: str):
        self.trainer, self.name = trainer, name
        self.sae = trainer.saes[name]
        self.opt: SAEAdam = trainer.optimizers[name]
        self.tracker = trainer.trackers[name]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out = None
        self.x: Tensor | None = None
        self.warm_calls = 0
        self.misfit_logged = False

    def _hyper_rows(self) -> Tensor:
        """[WINDOW, 2] (step_size, bc2_sqrt) of the steps from the trainer's current one (host)."""
        tr, sched = self.trainer, self.trainer.schedulers[self.name]
        group = self.opt.param_groups[0]
        t0 = int(self.opt._state(self.params[0])["step"])  # Adam steps taken so far
        rows = [self.opt.hyperparameters(group, t0 + j + 1, sched.base_lrs[0] * sched.lr_lambdas[0](tr.step + j))
                for j in range(self.WINDOW)]
        return torch.tensor(rows, dtype=torch.float32)

    def _device_step(self, x: Tensor, y: Tensor | None):
        tr = self.trainer
        out = tr.strategy.forward(self.sae, x, y, dead_mask=None, sparsity_scale=1.0)
        out.losses["loss"].backward()
        hyper = self.table.index_select(0, self.t).reshape(2)
        self.opt.device_step(self.params, hyper)
        self.tracker.update_device(tr.strategy.fired_counts(self.sae, out), tr.strategy.tokens_per_step(x.shape[0]))
        tr.finite.flag_batch(x, y)
        return out

    def prepare(self, x: Tensor, y: Tensor | None) -> None:
        """The graph's fixed buffers (batch, step row, device table), shaped like this batch."""
        device = x.device
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.table = self._hyper_rows().to(device)
        self.step0 = self.trainer.step
        self.t = torch.zeros(1, dtype=torch.long, device=device)
        self.x = x.clone()
        self.y = y.clone() if y is not None else None
        self.trainer.finite.flag_batch(self.x, self.y)  # allocate the flag outside the graph
        # The device step takes its learning rates from the table, not from optimizer.step(); tell
        # the LR scheduler so, or it warns that scheduler.step() came first and "skips" a value.
        self.opt._opt_called = True

    def fits(self, x: Tensor, y: Tensor | None) -> bool:
        """Whether this batch has the shapes of the graph's buffers (a short last batch does not)."""
        if self.x is None:
            return True
        if x.shape != self.x.shape or x.dtype != self.x.dtype or (y is None) != (self.y is None):
            return False
        return y is None or (y.shape == self.y.shape and y.dtype == self.y.dtype)

    @property
    def ready_to_capture(self) -> bool:
        return self.graph is None and self.x is not None and self.warm_calls >= self.WARMUP

    def _with_fresh_grads(self, fn):
        """``fn()`` with no ``.grad`` on the parameters before (backward writes them afresh, into the
        graph's pool when capturing) or after (an eager step in between must not accumulate into
        the graph's gradients)."""
        for p in self.params:
            p.grad = None
        out = fn()
        for p in self.params:
            p.grad = None
        return out

    def capture(self) -> None:
        """Capture the step on the buffers (nothing runs until :meth:`__call__` replays it)."""
        self._with_fresh_grads(self._record)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _record(self) -> None:
        """Capture :meth:`_device_step` on the buffers (nothing runs until :meth:`_replay`)."""
        device = self.x.device
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        # thread_local: the DeviceFeed thread keeps staging batches (pinned copies, events) meanwhile.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            self.out = self._device_step(self.x, self.y)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = graph

    def _replay(self) -> None:
        self.graph.replay()

    def __call__(self, x: Tensor, y: Tensor | None):
        """One training step: host bookkeeping, the batch into the graph's buffers, then the device
        step, eagerly while warming up, else by replay."""
        if self.x is None:
            self.prepare(x, y)
        self.x.copy_(x, non_blocking=True)
        if y is not None:
            self.y.copy_(y, non_blocking=True)
        if self.trainer.step - self.step0 >= self.WINDOW:  # next window, written in place (the graph reads it)
            self.table.copy_(self._hyper_rows())
            self.step0 = self.trainer.step
        self.t.fill_(self.trainer.step - self.step0)  # row of this step (eager AuxK steps may come between)
        self.opt.host_step(self.params)
        self.tracker.advance_host(self.trainer.strategy.tokens_per_step(x.shape[0]))
        if self.graph is None:
            self.warm_calls += 1
            self.out = self._with_fresh_grads(lambda: self._device_step(self.x, self.y))  # as a replay
        else:
            self._replay()
        return self.out


class GraphedSteps:
    """Each SAE's :class:`GraphedStep`, or why its steps run eagerly (one per trainer)."""

    def __init__(self) -> None:
        self.graphs: dict[str, GraphedStep] = {}
        self.off: dict[str, str] = {}  # SAE name -> why its steps run eagerly

    def step(self, trainer, name: str, sae, x: Tensor, y: Tensor | None):
        """This step through ``name``'s CUDA graph (its ForwardOutput), or None to run it eagerly.

        The first :attr:`GraphedStep.WARMUP` calls in this process run the graph's code eagerly
        (kernel compilation, loading and autotuning happen there, outside any capture); steps with
        dead latents (AuxK) and batches of another shape (a short last batch) run eagerly; a capture
        that fails turns graphs off for that SAE with a warning.
        """
        if name in self.off:
            return None
        graphed = self.graphs.get(name)
        if graphed is None:
            why = graphable(trainer, sae)
            if why is not None:
                self.off[name] = why
                if trainer.device.type == "cuda":
                    log.info("SAE %r: steps run eagerly, not as a CUDA graph (%s)", name, why)
                return None
            graphed = self.graphs[name] = GraphedStep(trainer, name)
        if trainer.strategy.step_dead_mask(trainer.trackers[name]) is not None:
            return None
        if not graphed.fits(x, y):
            if graphed.captured:  # e.g. a short last batch: eagerly, the graph stays for full batches
                if not graphed.misfit_logged:
                    graphed.misfit_logged = True
                    log.info("SAE %r: a batch of %d rows (the graph holds %d) runs eagerly", name, x.shape[0],
                             graphed.x.shape[0])
                return None
            graphed.x = None  # still warming up on a batch of another shape (a short first one): start again
            graphed.warm_calls = 0
        if graphed.ready_to_capture:
            try:
                graphed.capture()
            except Exception as e:  # noqa: BLE001 (fall back to eager steps, which are equivalent)
                self.off[name] = f"capture failed: {type(e).__name__}: {e}"
                del self.graphs[name]
                for p in sae.parameters():
                    p.grad = None
                if x.is_cuda:
                    torch.cuda.empty_cache()
                log.warning("SAE %r: CUDA graph capture failed, steps run eagerly: %s", name, e)
                return None
            log.info("SAE %r: training step captured as a CUDA graph at step %d", name, trainer.step)
        return graphed(x, y)
