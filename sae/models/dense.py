"""Shared parts of the families with dense codes (ReLU/L1 and JumpReLU).

Their codes are [B, L] by nature (no fixed k), so they use plain matmuls. Losses are made
independent of the activation scale: reconstruction is FVU, and magnitude penalties are divided
by the activation scale (:func:`activation_scale`), so one coefficient works for any model and
means what it means in the papers for activations normalised to E||y||^2 = d.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Codes, SparseCoder, SparseCodes, VarianceFn, fvu_from_error, token_variance


class DenseCodeSAE(SparseCoder):
    sparse_codes = False
    #: Whether the family revives silenced latents with :func:`ghost_grad_loss` (``sae.ghost_grads``).
    has_ghost_grads = False

    def pre_activations(self, x_in_BD: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x_in_BD, self.W_enc.T)

    def activation(self, pre_BL: Tensor) -> Tensor:
        raise NotImplementedError

    def encode(self, x_BD: Tensor) -> Tensor:
        self.check_x(x_BD)
        return self.activation(self.pre_activations(self.encoder_input(x_BD)))

    def decode(self, codes: Codes) -> Tensor:
        if isinstance(codes, SparseCodes):
            raise TypeError(f"{type(self).__name__}.decode expects dense [B, L] codes")
        return torch.addmm(self.b_dec, codes, self.W_dec)

    @property
    def l1_coefficient(self) -> float:
        """``sae.l1_coefficient`` resolved (null: :meth:`default_l1_coefficient`); checked >= 0."""
        value = self.default_l1_coefficient() if self.cfg.l1_coefficient is None else float(self.cfg.l1_coefficient)
        if value < 0:
            raise ValueError(f"sae.l1_coefficient={value} must be >= 0")
        return value

    def penalty_rule(self) -> str:
        """The L1 coefficient as a model card states it (starting value, and the target L0 it is steered to)."""
        coef = f"coefficient {self.l1_coefficient:g}"
        return f"starting {coef}, steered in training to L0 {self.target_l0:g}" if self.target_l0 > 0 else coef

    def default_l1_coefficient(self) -> float:
        """The L1 coefficient of ``sae.l1_coefficient=null`` (families with an L1 penalty)."""
        raise NotImplementedError(f"{type(self).__name__} has no L1 penalty")

    def ghost_grads_on(self) -> bool:
        """``sae.ghost_grads`` resolved for a family that has them: null is on for transcoders, off for SAEs."""
        if not self.has_ghost_grads:
            return False
        return self.cfg.transcode if self.cfg.ghost_grads is None else bool(self.cfg.ghost_grads)

    def dead_window_fraction(self) -> float | None:
        """With ghost grads, 2% of the run (they must start within a short one)."""
        return 0.02 if self.ghost_grads_on() else None

    def add_ghost_loss(self, losses: dict[str, Tensor], pre_BL: Tensor, dead_mask_L: Tensor | None, x_hat_BE: Tensor,
                       y_BE: Tensor, variance_fn: VarianceFn | None = None) -> None:
        """Add :func:`ghost_grad_loss` of the dead latents to ``losses`` (as "ghost" and into "loss")
        when ghost grads are on and some latent is dead."""
        if dead_mask_L is None or not self.ghost_grads_on():
            return
        ghost = ghost_grad_loss(pre_BL, dead_mask_L, self.W_dec, x_hat_BE, y_BE, variance_fn)
        if ghost is not None:
            losses["ghost"] = ghost
            losses["loss"] = losses["loss"] + ghost


def ghost_grad_loss(pre_BL: Tensor, dead_mask_L: Tensor, W_dec_LE: Tensor, x_hat_BE: Tensor, y_BE: Tensor,
                    variance_fn: VarianceFn | None = None) -> Tensor | None:
    """Ghost grads (Anthropic, "Circuits Updates - January 2024"; SAELens' ``use_ghost_grads``): a
    gradient that brings back latents a ReLU has silenced, or None when none is dead.

    A latent whose pre-activation is negative on every token gets no gradient from the
    reconstruction, so once the sparsity penalty has pushed it below zero it never returns. Here the
    dead latents reconstruct the residual ``y - x_hat`` through exp(pre) (positive, with a
    gradient everywhere), rescaled per token to half the residual's norm; the pre-activations of
    those whose decoder row points along the residual rise until they fire again. Each token's
    term is weighted so that its value equals that token's main squared error (the weights are
    detached), and the sum is divided like FVU: its value is the batch's FVU. Pre-activations are
    capped at 0 (a latent that fires on this batch is not silent here).

    As in the paper the factor is not bounded: where the dead rows are tiny (a transcoder's may
    still be at their zero init) W_dec's gradient spikes for a step (1.9e7 against 41 from the main
    loss on a toy Gated transcoder) and gradient clipping shrinks that step, until Adam has given
    the rows a direction. Bounded variants measured worse on SmolLM2's ReLU transcoder (dead 6.5%
    with the paper's factor; capped at 1: 15.5%; decoder rows held constant: 28.5%).
    """
    dead_idx = dead_mask_L.nonzero().squeeze(1)
    if dead_idx.numel() == 0:
        return None
    W_dead = W_dec_LE.index_select(0, dead_idx).float()
    ghost_BE = pre_BL.index_select(1, dead_idx).float().clamp_max(0).exp() @ W_dead
    residual_BE = y_BE.float() - x_hat_BE.detach().float()
    scale_B = residual_BE.norm(dim=1) / (2 * ghost_BE.norm(dim=1)).clamp_min(1e-6)
    ghost_err_B = (ghost_BE * scale_B.detach()[:, None] - residual_BE).pow(2).sum(1)
    weight_B = residual_BE.pow(2).sum(1) / ghost_err_B.detach().clamp_min(1e-12)
    return fvu_from_error(weight_B @ ghost_err_B, y_BE, variance_fn)


def activation_scale(y_BE: Tensor, variance_fn: VarianceFn | None = None) -> Tensor:
    """RMS per dimension of the centred target: sqrt(mean_b ||y_b - mean(y)||^2 / E).

    Equals 1 for activations normalised as in SAELens/Anthropic (E ||y||^2 = E), so coefficients
    given in those papers' units keep their meaning for activations of any scale.
    """
    return ((variance_fn or token_variance)(y_BE) / y_BE.shape[-1]).sqrt().clamp_min(1e-8).detach()
