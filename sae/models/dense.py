"""Shared parts of the families with dense codes (ReLU/L1 and JumpReLU).

Their codes are [B, L] by nature (no fixed k), so they use plain matmuls. Losses are made
independent of the activation scale: reconstruction is FVU, and magnitude penalties are divided
by the activation scale (:func:`activation_scale`), so one coefficient works for any model and
means what it means in the papers for activations normalised to E||y||^2 = d.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Codes, SparseCoder, SparseCodes, VarianceFn, token_variance


class DenseCodeSAE(SparseCoder):
    sparse_codes = False

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


def activation_scale(y_BE: Tensor, variance_fn: VarianceFn | None = None) -> Tensor:
    """RMS per dimension of the centred target: sqrt(mean_b ||y_b - mean(y)||^2 / E).

    Equals 1 for activations normalised as in SAELens/Anthropic (E ||y||^2 = E), so coefficients
    given in those papers' units keep their meaning for activations of any scale.
    """
    return ((variance_fn or token_variance)(y_BE) / y_BE.shape[-1]).sqrt().clamp_min(1e-8).detach()
