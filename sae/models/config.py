"""SAE architecture config: which family, how wide, how sparse, and its loss coefficients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class SAEConfig:
    """One sparse coder. Fields that a family ignores keep their defaults.

    ``num_latents`` wins over ``expansion_factor`` when set (> 0).
    """

    # topk | batchtopk | relu | jumprelu | gated | matryoshka_topk | matryoshka_batchtopk | clt
    architecture: str = "topk"
    expansion_factor: int = 16
    num_latents: int = 0
    k: int = 32
    # AuxK (Gao et al. 2024, sec. A.2): k_aux dead latents reconstruct the residual.
    k_aux: int = 0  # 0 -> d_in // 2
    auxk_alpha: float = 1.0 / 32.0
    # TopK family: after the data init of b_dec, scale W_enc and b_enc by the least-squares factor
    # that best fits the initial reconstruction of the sample to it (the top-k set is unchanged).
    # Without it, training starts with k unit-norm directions summed on every token and spends its
    # first steps shrinking the encoder.
    fit_encoder_scale: bool = True
    # TopK family: dtype of the dense pre-activations that only *select* latents (auto | float32 |
    # bfloat16). Selected values are recomputed in fp32 and gradients stay exact; bfloat16 halves
    # the encoder GEMM on GPUs and on CPUs with AVX512-BF16/AMX, at the price of near-ties at the
    # k-th place being broken by bf16 rounding. ``auto``: bfloat16 where the hardware multiplies
    # bf16 natively, else float32 (sae.models.precision). Ignored under autocast.
    selection_dtype: str = "auto"
    # BatchTopK: candidates per token considered by the batch-level selection (cap * k).
    batch_topk_cap: int = 4
    # BatchTopK: the inference threshold is a running average of the smallest kept activation per
    # batch with this momentum (a time constant of ~10 steps: it ends at the final weights' value
    # also in short runs and for transcoders, whose activations change scale while the decoder grows).
    threshold_momentum: float = 0.9
    # ReLU/L1 (Anthropic, April 2024 update): lambda * sum_i f_i * ||W_dec_i||; Gated: on the gate.
    # null: ReLU 5 for SAEs (the paper's), 1 for transcoders, whose coefficient is steered to
    # sae.target_l0 from there (from 5 a SmolLM2 MLP transcoder's L0 fell from 2281 to 16 within 50
    # steps, before the controller could react, and most latents never came back); Gated 1.
    l1_coefficient: Optional[float] = None  # noqa: UP045
    sparsity_warmup_steps: int = 1000
    # ReLU, Gated: ghost grads (sae/models/dense.py) for latents dead for train.dead_tokens_threshold tokens.
    # null: on for transcoders, off for SAEs.
    ghost_grads: Optional[bool] = None  # noqa: UP045
    # JumpReLU (Rajamanoharan et al. 2024): lambda * L0 with straight-through estimators.
    l0_coefficient: float = 1.0
    # ReLU, JumpReLU, Gated (and a JumpReLU CLT): the L0 the trainer steers the penalty's coefficient
    # to, starting from the one above (sae/train/sparsity.py; the linear warm-up is then off).
    # null (default): sae.k for per-layer transcoders, a fixed coefficient for SAEs and CLTs;
    # 0: a fixed coefficient.
    target_l0: Optional[float] = None  # noqa: UP045
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.001
    # JumpReLU: the log-thresholds' learning rate as a multiple of train.lr. Adam moves every weight
    # by about lr per step: an encoder weight of size 1/sqrt(d) changes by a fraction lr*sqrt(d),
    # a log-threshold by lr, so the thresholds lag the pre-activations and L0 follows the penalty
    # only over tens of thousands of steps. null: 1 for SAEs (as SAELens); sqrt(d_in) for
    # transcoders, whose L0 is steered to sae.target_l0 (24 on SmolLM2's MLP: FVU 0.165 at L0 17 with
    # 1.2% dead after 300 steps; 96: 11% dead; 192: 55% dead).
    threshold_lr_scale: Optional[float] = None  # noqa: UP045
    # Transcoders: encode the input hook point, reconstruct the target hook point.
    transcode: bool = False
    skip_connection: bool = False
    # Unit-norm decoder rows. null (default): true for SAEs, false for transcoders, whose decoder then
    # starts at zero (sparsify's transcoder init; see sae/models/base.py).
    normalize_decoder: Optional[bool] = None  # noqa: UP045 (OmegaConf 2.3 reads Optional, not X | None)
    # Pre-encoder bias initialisation from data: geometric_median | mean | zeros.
    b_dec_init: str = "geometric_median"
    # Matryoshka (Bussmann et al. 2025; Nabeshima 2024): latent counts of the nested groups, in
    # order; prefix m is groups[0..m]. They must sum to the number of latents. Empty: halving
    # groups L/2^(n-1), ..., L/4, L/2 with the smallest at least k (paper's default shape).
    matryoshka_groups: list[int] = field(default_factory=list)
    # Cross-layer transcoder / crosscoder: number of layers (d_in = d_out = clt_layers * d_model,
    # the layers' activations side by side); activation of each layer's latents (topk | batchtopk
    # | jumprelu); acausal: every latent reads every layer and writes every layer (crosscoder).
    clt_layers: int = 0
    clt_activation: str = "topk"
    clt_acausal: bool = False
