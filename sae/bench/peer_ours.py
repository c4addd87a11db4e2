"""Runner of the peer benchmark for sae-forge itself: our Trainer on the shared activation file.

    python -m sae.bench.peer_ours JOB.json      (started by ``python -m sae.bench.peers``)

Builds the SAE with :func:`sae.models.build_sae` and trains it with :class:`sae.train.trainer.Trainer`
(``fit``: data-dependent init, fused Adam, the decoder-gradient projection, clipping, decoder
renormalisation, AuxK with dead-latent tracking) on the batches of the train split in file order,
then leaves the trained SAE in our folder format under ``<out_dir>/train/final/<arch>`` and writes
``result.json`` (see :mod:`sae_peers.runtime`).

``selection_dtype`` in the job (``ours-fp32``) sets ``sae.selection_dtype``; without it the default
``auto`` applies, and the result's notes say what it resolved to on this machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sae_peers import runtime as rt

from sae.buffer.source import Batch
from sae.models import SAEConfig, build_sae
from sae.models.precision import resolve_selection_dtype
from sae.train.config import TrainConfig
from sae.train.trainer import Trainer


class _FileSource:
    """An ActivationSource over :class:`~sae_peers.runtime.TimedBatches` (no resume: one run, start to end)."""

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
        progress=False, out_dir=str(Path(job["out_dir"]) / "train"),  # the job folder holds job.json, log.txt
    )


def sae_config(job: dict[str, Any]) -> SAEConfig:
    return SAEConfig(architecture=job["arch"], num_latents=job["num_latents"], k=job["k"],
                     auxk_alpha=job["auxk_alpha"], l0_coefficient=job["l0_coefficient"],
                     jumprelu_bandwidth=job["jumprelu_bandwidth"],
                     sparsity_warmup_steps=job["sparsity_warmup_steps"],
                     selection_dtype=job.get("selection_dtype", "auto"))


def main(argv: list[str] | None = None) -> None:
    job = rt.read_job(argv)
    rt.set_threads(job["threads"])
    data = rt.ActivationFile(job["data"])
    batches = rt.TimedBatches(data, job["batch"], job["steps"])
    rss_start = rt.baseline_rss_mib()
    sae = build_sae(sae_config(job), batches.d, seed=job["seed"])
    trainer = Trainer(train_config(job), {job["arch"]: sae}, _FileSource(batches))
    setting = sae.cfg.selection_dtype
    resolved = str(resolve_selection_dtype(setting, trainer.device)).removeprefix("torch.")
    notes = [f"sae.selection_dtype={setting} ({resolved} selection on this machine; values, gradients, weights "
             "and Adam in fp32)"] if sae.cfg.architecture in ("topk", "batchtopk") else []
    trainer.fit()
    rt.write_result(job, rt.summarize(job, batches, rss_start, library="sae-forge",
                                      weights=str(trainer.final_dirs[job["arch"]]), notes=notes))


if __name__ == "__main__":
    main()
