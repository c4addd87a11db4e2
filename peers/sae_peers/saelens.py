"""Runner of the peer benchmark for SAELens: its own training SAE classes and its ``SAETrainer``.

    <peers venv>/bin/python -P -m sae_peers.saelens JOB.json   (started by ``python -m sae.bench.peers``)

Runs in the SAELens virtual environment and never imports sae-forge (only
:mod:`sae_peers.runtime`). ``SAETrainer.fit`` consumes any iterator of activation batches (its
``DataProvider``), so SAELens trains exactly as it does from its own activation store: the
training SAE's ``training_forward_pass`` (TopK: dense pre-activations, TopK, decoder-norm
rescaling of the selection, AuxK; BatchTopK; JumpReLU with its straight-through estimators),
``torch.optim.Adam``, gradient-norm clipping at 1 and its LR scheduler.

Settings mapped onto SAELens' units (its losses are sums of squares per token, ours are FVU):
AuxK weight ``aux_loss_coefficient = auxk_alpha`` (both of its terms share one scale, as ours
do); JumpReLU ``l0_coefficient = lambda * variance`` and ``jumprelu_bandwidth = bandwidth *
act_scale``; the dead-latent window in steps = dead tokens / batch. The shared schedule (linear
warm-up, then linear decay to 0) is SAELens' ``constant`` scheduler with warm-up and decay
steps. Everything else keeps SAELens' defaults (decoder init norm 0.1, zero ``b_dec``,
``rescale_acts_by_decoder_norm``). The trained SAE is saved with ``save_inference_model``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")


from sae_peers import runtime as rt  # noqa: E402


def build(job: dict, d: int):
    """The SAELens training SAE for ``job["arch"]``."""
    import sae_lens as sl

    common = {"d_in": d, "d_sae": job["num_latents"], "dtype": "float32", "device": "cpu"}
    if job["arch"] == "topk":
        return sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(k=job["k"], aux_loss_coefficient=job["auxk_alpha"],
                                                           **common))
    if job["arch"] == "batchtopk":
        return sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(
            k=float(job["k"]), aux_loss_coefficient=job["auxk_alpha"], **common))
    if job["arch"] == "jumprelu":
        return sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(
            l0_coefficient=job["l0_coefficient"] * job["variance"],
            jumprelu_bandwidth=job["jumprelu_bandwidth"] * job["act_scale"],
            l0_warm_up_steps=job["sparsity_warmup_steps"], **common))
    raise ValueError(f"SAELens runner: unknown arch {job['arch']!r}; use topk, batchtopk or jumprelu")


def trainer_config(job: dict):
    from sae_lens.config import SAETrainerConfig

    steps, warmup = job["steps"], job["warmup_steps"]
    return SAETrainerConfig(
        total_training_samples=steps * job["batch"], train_batch_size_samples=job["batch"], lr=job["lr"],
        lr_end=job["lr"], lr_scheduler_name="constant", lr_warm_up_steps=warmup, lr_decay_steps=max(steps - warmup, 0),
        adam_beta1=0.9, adam_beta2=0.999, device="cpu",
        dead_feature_window=max(1, job["dead_tokens"] // job["batch"]),
    )


def main() -> None:
    job = rt.read_job()
    rt.set_threads(job["threads"])
    try:
        import sae_lens
        from sae_lens import SAETrainer
    except ImportError as e:
        rt.write_result(job, {"skipped": f"sae_lens is not importable by {sys.executable}: {e}"})
        sys.exit(3)
    import torch

    data = rt.ActivationFile(job["data"])
    batches = rt.TimedBatches(data, job["batch"], job["steps"])
    rss_start = rt.baseline_rss_mib()
    torch.manual_seed(job["seed"])
    sae = build(job, batches.d)
    trainer = SAETrainer(cfg=trainer_config(job), sae=sae, data_provider=iter(batches))
    trainer.fit()
    folder = Path(job["out_dir"]) / "weights"
    sae.save_inference_model(folder)
    rt.write_result(job, rt.summarize(job, batches, rss_start, library=f"sae-lens {sae_lens.__version__}",
                                      weights=str(folder), notes=[]))


if __name__ == "__main__":
    main()
