"""Trainer config: batch, budget, optimiser, schedule, precision, checkpoints, logging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

#: train.loss: mse (reconstruction only) or an end-to-end loss (sae.train.end_to_end).
LOSSES = ("mse", "kl", "ce", "kl+mse")


@dataclass
class TrainConfig:
    batch_size: int = 4096
    # Budget: ``steps`` wins when > 0, otherwise ``max_tokens // batch_size``.
    max_tokens: int = 2_000_000
    steps: int = 0
    # Adam. lr null picks Gao et al.'s scaling rule: 2e-4 / sqrt(num_latents / 2**14), times the family's
    # default_lr_scale (2 for Matryoshka BatchTopK transcoders, sae/models/matryoshka.py; else 1).
    lr: Optional[float] = None  # noqa: UP045  (OmegaConf needs typing.Optional)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    # Linear LR warm-up. null: 5% of the run's steps, at most 1000 (a 132-step run warms up for 7
    # steps), see sae.train.schedule.warmup_steps.
    lr_warmup_steps: Optional[int] = None  # noqa: UP045
    lr_decay: str = "linear"  # constant | linear | cosine
    lr_decay_start: float = 0.8  # fraction of training after which the LR decays to lr_end
    lr_end_factor: float = 0.0
    grad_clip: float = 1.0  # <= 0 disables
    grad_accum_steps: int = 1  # chunks per batch; the batch's gradient is accumulated over them
    mixed_precision: str = "no"  # no | bf16
    # Exact mode: sae.selection_dtype=auto means float32 and the optimiser step is the unfused
    # sequence (projection, clip, torch Adam, renorm), so results are bitwise those of an exact
    # fp32 run whatever the hardware. Default: bf16 selection where native and, with Triton on
    # CUDA, the fused step (sae.train.optim.SAEAdam), equal to the unfused one up to fp32 rounding.
    deterministic: bool = False
    # Adam moments in float32 or bfloat16 (half their memory; fused step only).
    adam_state_dtype: str = "float32"
    # Batches staged onto the GPU this many steps ahead (pinned staging buffers, a copy stream, no
    # host sync; sae.buffer.device_feed). 0: off. No effect on a CPU.
    prefetch_to_device: int = 2
    # Capture each TopK SAE's step as a CUDA graph after 2 warm-up steps per process and replay it (one launch
    # instead of dozens; sae/train/graphed.py says when a step qualifies).
    cuda_graphs: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    parallel: str = "none"  # none | data | latent | sae (one SAE per rank: hook points, sweeps)
    seed: int = 0
    # Dead latents (AuxK, ghost grads, the dead fraction logged): not fired in this many tokens.
    # null: Gao et al.'s 10M; 2% of the run's tokens (at most 10M) for ReLU and Gated transcoders,
    # whose ghost grads must start within a short run (sae.train.dead.resolve_dead_threshold).
    dead_tokens_threshold: Optional[int] = None  # noqa: UP045
    b_dec_init_samples: int = 4096
    # What the SAE is trained to preserve (sae.train.end_to_end): mse (its reconstruction; any data
    # source) | kl (the model's next-token distribution: KL(clean || spliced), the SAE's output
    # spliced into the frozen model's forward) | ce (the spliced model's next-token cross-entropy) |
    # kl+mse (KL plus mse_coefficient x the reconstruction FVU). kl, ce and kl+mse need data=live on a
    # causal LM; a step then reads batch_size / context_length whole contexts. The family's other
    # terms (AuxK, sparsity penalties) stay in every loss.
    loss: str = "mse"
    mse_coefficient: float = 1.0
    # Fine-tune a published SAE instead of a fresh one: a folder or Hub repo id in our, SAELens' or
    # sparsify's format (``sae.export.load_pretrained``); its architecture and sizes replace ``sae.*``,
    # and no data-dependent init runs. ``init_hookpoint`` picks one SAE of a multi-SAE repo.
    init_from: str = ""
    init_hookpoint: str = ""
    # Checkpoints: every N steps (0: only at the end), keeping the newest ``keep_checkpoints``.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = True
    log_every: int = 10
    # Held-out evaluation every N steps (0: off), on ``eval_batches`` batches of the held-out split;
    # logged as eval/<metric>/<sae name> next to the train/ metrics.
    eval_every: int = 1000
    eval_batches: int = 4
    # After training: the full evaluation (sae-eval defaults: held-out data, spliced model, plots,
    # report.html in final/<name>/eval/), summarised in the final print.
    final_report: bool = True
    progress: bool = True
    out_dir: str = "runs/default"
