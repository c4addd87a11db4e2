"""Standard ReLU SAE with an L1 penalty (Anthropic, "Circuits Updates - April 2024").

    f = ReLU(W_enc x + b_enc),  x_hat = W_dec^T f + b_dec
    loss = FVU + lambda_t * mean_b sum_i f_i ||W_dec_i|| / (d * scale(y))

With activations normalised to E||y||^2 = d (scale 1), this is the paper's
MSE_sum + lambda * sum_i f_i ||W_dec_i|| divided by d, so lambda keeps its published meaning
(about 5).

The penalty weights each latent by its decoder norm, so the decoder is left unconstrained
(rows start at norm 0.1). ``lambda_t`` warms up linearly from 0 over ``sparsity_warmup_steps``;
the trainer passes the current factor as ``sparsity_scale``.
"""

from __future__ import annotations

from torch import Tensor

from .base import ForwardOutput, VarianceFn, fvu
from .config import SAEConfig
from .dense import DenseCodeSAE, activation_scale
from .registry import register


@register("relu")
class ReLUSAE(DenseCodeSAE):
    sparsity_penalty = True
    has_ghost_grads = True
    # On a tiny GPT-2's MLP (tests/models/test_transcoder_defaults.py) the ReLU transcoder learns on
    # raw activations and not on normalised ones (FVU 0.06 at L0 39 raw with the current defaults;
    # 0.88 normalised).
    normalize_transcoder_data = False
    unit_norm_decoder = False

    def sparsity_rule(self) -> str:
        return f"L1 penalty ({self.penalty_rule()})"

    def __init__(self, cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
        super().__init__(cfg, d_in, d_out, seed=seed)
        self.l1_coefficient  # noqa: B018 (validates sae.l1_coefficient)

    def default_l1_coefficient(self) -> float:
        """5 for SAEs (the April 2024 update's); 1 for transcoders, the start of the target-L0 steering."""
        return 1.0 if self.cfg.transcode else 5.0

    def activation(self, pre_BL: Tensor) -> Tensor:
        return pre_BL.relu()

    def forward(self, x_BD: Tensor, y_BE: Tensor | None = None, *, dead_mask: Tensor | None = None,
                sparsity_scale: float = 1.0, variance_fn: VarianceFn | None = None) -> ForwardOutput:
        y_BE = self.check_input(x_BD, y_BE)
        pre = self.pre_activations(self.encoder_input(x_BD))
        f = self.activation(pre)
        x_hat = self.reconstruct(x_BD, f)
        rec = fvu(x_hat, y_BE, variance_fn)
        l1 = (f @ self.W_dec.norm(dim=1)).mean() / (self.d_out * activation_scale(y_BE, variance_fn))
        losses = {"fvu": rec, "l1": l1, "loss": rec + self.l1_coefficient * sparsity_scale * l1}
        self.add_ghost_loss(losses, pre, dead_mask, x_hat, y_BE, variance_fn)
        return ForwardOutput(x_hat, f, losses)
