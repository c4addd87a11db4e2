"""Gated SAE (Rajamanoharan, Conmy, Smith, Lieberum, Varma, Kramár, Shah & Nanda 2024,
"Improving Dictionary Learning with Gated Sparse Autoencoders").

Which latents fire and how strongly are estimated by two paths that share their directions:

    x~ = x - b_dec
    pi_gate = W_gate x~ + b_gate                                    gate: f_gate = 1[pi_gate > 0]
    pi_mag  = (exp(r_mag) * W_gate) x~ + b_mag = exp(r_mag) * (W_gate x~) + b_mag
    f = f_gate * ReLU(pi_mag),   x_hat = W_dec^T f + b_dec

so the L1 penalty shrinks only the gate, not the magnitudes (no shrinkage bias). Loss (paper,
eq. 7), in this project's scale-free units (each term divided like FVU; see :mod:`.dense`):

    FVU(x, x_hat) + lambda_t * mean_b ||ReLU(pi_gate)||_1 / (d scale(x))
                  + FVU(x, W_dec^T ReLU(pi_gate) + b_dec  with W_dec, b_dec frozen)

The last (auxiliary) term gives the gate's parameters a reconstruction signal: f_gate has zero
derivative, so without it W_gate would learn only through the magnitude path and b_gate only
from the penalty. The decoder copies in it are stop-gradient, as in the paper (SAELens does not
freeze them). Decoder rows are kept at unit norm, as in the paper. Here ``W_enc`` is W_gate,
``b_enc`` is b_gate; ``r_mag`` and ``b_mag`` are the magnitude path's own parameters. One GEMM
serves both paths. SAELens' ``gated`` architecture has the same parameters (``b_gate`` for our
``b_enc``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import ForwardOutput, VarianceFn, fvu
from .config import SAEConfig
from .dense import DenseCodeSAE, activation_scale
from .registry import register


@register("gated")
class GatedSAE(DenseCodeSAE):
    sparsity_penalty = True
    has_ghost_grads = True
    # Like ReLU, it learns on raw activations: on a tiny GPT-2's MLP (tests/models/test_transcoder_defaults.py)
    # FVU 0.09 at L0 25 raw vs 0.47 normalised; on SmolLM2's layer-10 MLP 0.39 at L0 63 raw vs 0.25 at 58.
    normalize_transcoder_data = False

    def sparsity_rule(self) -> str:
        return f"gate with an L1 penalty ({self.penalty_rule()}), magnitudes unpenalised"

    def __init__(self, cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
        super().__init__(cfg, d_in, d_out, seed=seed)
        self.l1_coefficient  # noqa: B018 (validates sae.l1_coefficient)
        self.r_mag = nn.Parameter(torch.zeros(self.num_latents))
        self.b_mag = nn.Parameter(torch.zeros(self.num_latents))

    def default_l1_coefficient(self) -> float:
        return 1.0

    @torch.no_grad()
    def init_from_data(self, x_sample_ND: Tensor, y_sample_NE: Tensor | None = None) -> None:
        """b_dec from data, then the magnitude scale ``r_mag`` set to the least-squares factor that
        fits the initial reconstruction to the sample: at initialisation about half the gates are
        open, and unit-norm rows summed over them overshoot the data by orders of magnitude. The
        gate (which latents fire) is unchanged."""
        super().init_from_data(x_sample_ND, y_sample_NE)
        x = x_sample_ND.float()
        y = (x if y_sample_NE is None else y_sample_NE.float()) - self.b_dec
        skip = self.skip(x)
        if skip is not None:
            y = y - skip
        y_hat = self.encode(x) @ self.W_dec
        scale = float((y_hat * y).sum() / y_hat.pow(2).sum().clamp_min(1e-12))
        if scale > 0:
            self.r_mag.add_(math.log(scale))

    def paths(self, x_in_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(pi_gate, pi_mag), each [B, L], from one GEMM."""
        h = x_in_BD @ self.W_enc.T
        return h + self.b_enc, torch.addcmul(self.b_mag, h, self.r_mag.exp())

    def encode(self, x_BD: Tensor) -> Tensor:
        self.check_x(x_BD)
        pi_gate, pi_mag = self.paths(self.encoder_input(x_BD))
        return (pi_gate > 0) * pi_mag.relu()

    def activation(self, pre_BL: Tensor) -> Tensor:
        raise TypeError("a gated SAE has two pre-activations; use encode(x)")

    def forward(self, x_BD: Tensor, y_BE: Tensor | None = None, *, dead_mask: Tensor | None = None,
                sparsity_scale: float = 1.0, variance_fn: VarianceFn | None = None) -> ForwardOutput:
        y_BE = self.check_input(x_BD, y_BE)
        pi_gate, pi_mag = self.paths(self.encoder_input(x_BD))
        f = (pi_gate > 0) * pi_mag.relu()
        x_hat = self.reconstruct(x_BD, f)
        rec = fvu(x_hat, y_BE, variance_fn)
        gate = pi_gate.relu()
        l1 = (gate @ self.W_dec.detach().norm(dim=1)).mean() / (self.d_out * activation_scale(y_BE, variance_fn))
        aux_hat = torch.addmm(self.b_dec.detach(), gate, self.W_dec.detach())
        skip = self.skip(x_BD)
        aux = fvu(aux_hat if skip is None else aux_hat + skip.detach(), y_BE, variance_fn)
        losses = {"fvu": rec, "l1": l1, "aux": aux, "loss": rec + self.l1_coefficient * sparsity_scale * l1 + aux}
        self.add_ghost_loss(losses, pi_gate, dead_mask, x_hat, y_BE, variance_fn)
        return ForwardOutput(x_hat, f, losses)
