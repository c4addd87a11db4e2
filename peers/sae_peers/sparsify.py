"""Runner of the peer benchmark for EleutherAI sparsify: its own ``Trainer.fit`` and ``SparseCoder``.

    <peers venv>/bin/python -P -m sae_peers.sparsify JOB.json   (started by ``python -m sae.bench.peers``)

Runs in the sparsify virtual environment and never imports sae-forge (only
:mod:`sae_peers.runtime`). sparsify's ``Trainer`` reads activations only from forward hooks on a
language model it runs itself; it cannot take precomputed activations. Instead of
re-implementing its step, this runner hands it a stand-in model (:class:`ActivationModel`)
whose ``layers.0`` outputs the next rows of the shared activation file, and a dataset of row
indices in place of token ids. Everything else is sparsify's own code, unmodified: the hook
(``b_dec`` from the first batch's mean, decoder rows renormalised before each forward,
``SparseCoder.forward`` with its fused encoder, AuxK), removing the decoder-gradient component
parallel to the rows, ``torch.optim.Adam`` (bitsandbytes' 8-bit Adam when it is installed,
as sparsify chooses), its linear warm-up/decay schedule and its dead-latent counters. The
trained coder is saved by sparsify's own checkpoint code (``save_to_disk``).

A batch is ``batch / context`` sequences of ``context`` rows (4096 = 32 x 128), matching how
sparsify counts batches. sparsify's ``Trainer.fit`` sets ``torch.set_float32_matmul_precision
("high")``; it is kept (it is sparsify's choice).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder fails on CPU tensors
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


import torch  # noqa: E402
from torch import nn  # noqa: E402

from sae_peers import runtime as rt  # noqa: E402

CONTEXT = 128


class ActivationModel(nn.Module):
    """Stands in for the language model: ``forward(input_ids)`` returns the activation rows whose
    indices ``input_ids`` holds ([sequences, context] -> [sequences, context, d]) through
    ``layers.0``, the hook point sparsify trains on."""

    def __init__(self, batches, target: str = ""):
        super().__init__()
        self.batches, self.target = batches, target
        # A transcoder job: layers.0 maps the batch's input rows to its target rows ("train_y"), so
        # sparsify's hook sees the module input as x and the output as y, as on a real MLP.
        self.layers = nn.ModuleList([TargetLookup() if target else nn.Identity()])
        self.config = SimpleNamespace(num_hidden_layers=1)
        self.dummy_inputs = {"input_ids": torch.zeros(1, CONTEXT, dtype=torch.long)}
        self.training_started = False

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.numel()
        if not self.training_started:  # sparsify's width probe (resolve_widths): no batch consumed
            start = 0
            x = self.batches.data.rows("train", 0, n)
        else:
            if n != self.batches.batch:
                raise ValueError(f"sparsify asked for {n} rows per batch; the job's batch is {self.batches.batch}")
            i = int(input_ids[0, 0]) // n
            start = (i % self.batches.num_batches) * n
            x = self.batches.get(i)
        if self.target:
            self.layers[0].y = self.batches.data.rows(self.target, start, n).view(*input_ids.shape, -1)
        return self.layers[0](x.view(*input_ids.shape, -1))


class TargetLookup(nn.Module):
    """``forward(x)`` returns the target rows set for this batch (a transcoder's module output)."""

    def __init__(self):
        super().__init__()
        self.y: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.y


class RowIndexDataset:
    """``steps * batch / context`` items of ``context`` consecutive row indices (``input_ids``)."""

    def __init__(self, steps: int, batch: int):
        self.n = steps * batch // CONTEXT

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"input_ids": torch.arange(i * CONTEXT, (i + 1) * CONTEXT)}


def main() -> None:
    job = rt.read_job()
    rt.set_threads(job["threads"])
    if job["arch"] != "topk":
        raise SystemExit(f"sparsify runner: sparsify trains TopK sparse coders only, not {job['arch']!r}")
    if job["batch"] % CONTEXT:
        raise SystemExit(f"sparsify runner: batch {job['batch']} must be a multiple of {CONTEXT} rows")
    try:
        import sparsify
        from sparsify import SparseCoderConfig, TrainConfig, Trainer
    except ImportError as e:
        rt.write_result(job, {"skipped": f"sparsify is not importable by {sys.executable}: {e}"})
        sys.exit(3)
    from importlib.metadata import version

    data = rt.ActivationFile(job["data"])
    batches = rt.TimedBatches(data, job["batch"], job["steps"])
    transcode = bool(job.get("transcode"))
    model = ActivationModel(batches, target="train_y" if transcode else "")
    rss_start = rt.baseline_rss_mib()
    cfg = TrainConfig(
        SparseCoderConfig(activation="topk", num_latents=job["num_latents"], k=job["k"], transcode=transcode),
        batch_size=job["batch"] // CONTEXT, optimizer="adam", lr=job["lr"], lr_warmup_steps=job["warmup_steps"],
        auxk_alpha=job["auxk_alpha"], dead_feature_threshold=job["dead_tokens"], hookpoints=["layers.0"],
        init_seeds=[job["seed"]], log_to_wandb=False, save_every=10**9, save_dir=job["out_dir"], run_name="run",
    )
    trainer = Trainer(cfg, RowIndexDataset(job["steps"], job["batch"]), model)
    model.training_started = True
    trainer.fit()
    folder = Path(job["out_dir"]) / "run" / "layers.0"
    rt.write_result(job, rt.summarize(job, batches, rss_start, library=f"eai-sparsify {version('eai-sparsify')}",
                                      weights=str(folder), sparsify_module=sparsify.__file__,
                                      notes=["sparsify's Trainer.fit on a stand-in model that outputs the shared "
                                             "activations at layers.0 (it cannot read precomputed activations)"]))


if __name__ == "__main__":
    main()
