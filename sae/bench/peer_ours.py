"""Runner of the peer benchmark for sae-forge itself: our Trainer on the shared activation file.

    python -m sae.bench.peer_ours JOB.json      (started by ``python -m sae.bench.peers``)

Builds the SAE with :func:`sae.models.build_sae` and trains it with :class:`sae.train.trainer.Trainer`
(``fit``: data-dependent init, fused Adam, the decoder-gradient projection, clipping, decoder
renormalisation, AuxK with dead-latent tracking) on the batches of the train split in file order,
then leaves the trained SAE in our folder format under ``<out_dir>/final/<arch>`` and writes
``result.json`` (see :mod:`sae.bench.peer_runtime`).

``encoder_init: "lsq"`` in the job is a proposal measured by the benchmark, not (yet) our
default: after the usual data init, the encoder (W_enc, b_enc) of a TopK-family SAE is scaled by
the least-squares factor that fits its initial reconstruction of the first batch to the batch,
as our JumpReLU's init already does. A positive scale leaves the selected latents unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from sae.bench import peer_runtime as rt
from sae.buffer.source import Batch
from sae.models import SAEConfig, SparseCodes, build_sae
from sae.models.topk import TopKSAE
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer


class _FileSource:
    """An ActivationSource over :class:`~sae.bench.peer_runtime.TimedBatches` (no resume: one run, start to end)."""

    def __init__(self, batches: rt.TimedBatches):
        self.batches, self.d_in, self.d_out = batches, batches.d, batches.d

    def __iter__(self) -> Iterator[Batch]:
        return (Batch(x) for x in self.batches)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def train_config(job: dict[str, Any]) -> TrainConfig:
    """Our TrainConfig for the job: Adam, linear warm-up then linear decay to 0 (the shared schedule)."""
    steps, warmup = job["steps"], job["warmup_steps"]
    return TrainConfig(
        batch_size=job["batch"], steps=steps, lr=job["lr"], lr_warmup_steps=warmup, lr_decay="linear",
        lr_decay_start=(warmup + 0.5) / steps if warmup < steps else 1.0, lr_end_factor=0.0,
        grad_clip=1.0, device="cpu", seed=job["seed"], dead_tokens_threshold=job["dead_tokens"],
        b_dec_init_samples=job["batch"], resume=False, log_every=50, eval_every=0, final_report=False,
        progress=False, out_dir=job["out_dir"],
    )


def sae_config(job: dict[str, Any]) -> SAEConfig:
    return SAEConfig(architecture=job["arch"], num_latents=job["num_latents"], k=job["k"],
                     auxk_alpha=job["auxk_alpha"], l0_coefficient=job["l0_coefficient"],
                     jumprelu_bandwidth=job["jumprelu_bandwidth"],
                     sparsity_warmup_steps=job["sparsity_warmup_steps"])


@torch.no_grad()
def fit_encoder_scale(sae: TopKSAE, x_BD: torch.Tensor) -> float:
    """Scale W_enc and b_enc by argmin_s ||s * (x_hat - b_dec) - (x - b_dec)||^2 over ``x``; returns s.

    Codes are the per-token top-k (also for BatchTopK, whose batch selection would move its
    threshold estimate).
    """
    pre = sae.pre_activations(sae.encoder_input(x_BD))
    vals, idx = pre.topk(sae.k, dim=1, sorted=False)
    x_hat = sae.decode(SparseCodes(vals.relu(), idx)) - sae.b_dec
    y = x_BD - sae.b_dec
    scale = float((x_hat * y).sum() / (x_hat * x_hat).sum().clamp_min(1e-12))
    if scale > 0:
        sae.W_enc.mul_(scale)
        sae.b_enc.mul_(scale)
    return scale


def main(argv: list[str] | None = None) -> None:
    job = rt.read_job(argv)
    rt.set_threads(job["threads"])
    data = rt.ActivationFile(job["data"])
    batches = rt.TimedBatches(data, job["batch"], job["steps"])
    rss_start = rt.baseline_rss_mib()
    sae = build_sae(sae_config(job), batches.d, seed=job["seed"])
    trainer = Trainer(train_config(job), {job["arch"]: sae}, _FileSource(batches))
    notes, extra = [], {}
    if job.get("encoder_init", "default") == "lsq":
        if not isinstance(sae, TopKSAE):
            raise SystemExit(f"encoder_init=lsq applies to the TopK family, not {job['arch']!r}")
        first = Batch(data.rows("train", 0, job["batch"]))
        trainer.init_from_data(first)  # what fit() would do on the same first batch
        extra["encoder_scale"] = fit_encoder_scale(sae, first.x)
        trainer.data_init = False
        notes.append("ours+lsq-init: our Trainer after a least-squares rescaling of the initial encoder "
                     "(a proposed init, not the current default)")
    trainer.fit()
    rt.write_result(job, rt.summarize(job, batches, rss_start, library="sae-forge",
                                      weights=str(trainer.final_dirs[job["arch"]]), notes=notes, **extra))


if __name__ == "__main__":
    main()
