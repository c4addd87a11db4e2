"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope).

    f_i = z_i * H(z_i - theta_i),  z = W_enc (x - b_dec) + b_enc,  theta = exp(log_threshold)
    loss = FVU + lambda_t * mean_b sum_i H(z_i - theta_i)

H has zero derivative almost everywhere, so theta learns through straight-through estimators
with a rectangle kernel of bandwidth eps (paper, eqs. 11-12):
    d/dtheta JumpReLU(z) ~= -(theta / eps) * rect((z - theta) / eps)
    d/dtheta H(z - theta) ~= -(1 / eps) * rect((z - theta) / eps)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import ForwardOutput, fvu
from .config import SAEConfig
from .dense import DenseCodeSAE
from .registry import register


def _rect(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        g_z = g * (z > theta)
        g_theta = (-(theta / ctx.eps) * _rect((z - theta) / ctx.eps) * g).sum(0)
        return g_z, g_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, theta = ctx.saved_tensors
        g_theta = (-(1.0 / ctx.eps) * _rect((z - theta) / ctx.eps) * g).sum(0)
        return None, g_theta, None


@register("jumprelu")
class JumpReLUSAE(DenseCodeSAE):
    def __init__(self, cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
        super().__init__(cfg, d_in, d_out, seed=seed)
        if cfg.jumprelu_bandwidth <= 0 or cfg.jumprelu_init_threshold <= 0:
            raise ValueError(
                f"sae.jumprelu_bandwidth={cfg.jumprelu_bandwidth} and sae.jumprelu_init_threshold="
                f"{cfg.jumprelu_init_threshold} must be positive"
            )
        self.log_threshold = nn.Parameter(torch.full((self.num_latents,), math.log(cfg.jumprelu_init_threshold)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def activation(self, pre_BL: Tensor) -> Tensor:
        return _JumpReLU.apply(pre_BL.relu(), self.threshold, self.cfg.jumprelu_bandwidth)

    def forward(self, x_BD: Tensor, y_BE: Tensor | None = None, *, dead_mask: Tensor | None = None,
                sparsity_scale: float = 1.0) -> ForwardOutput:
        y_BE = self.check_input(x_BD, y_BE)
        z = self.pre_activations(self.encoder_input(x_BD)).relu()
        theta = self.threshold
        f = _JumpReLU.apply(z, theta, self.cfg.jumprelu_bandwidth)
        x_hat = self.reconstruct(x_BD, f)
        rec = fvu(x_hat, y_BE)
        l0 = _Step.apply(z, theta, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        loss = rec + self.cfg.l0_coefficient * sparsity_scale * l0
        return ForwardOutput(x_hat, f, {"fvu": rec, "l0": l0, "loss": loss})
