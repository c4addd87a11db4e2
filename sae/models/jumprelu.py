"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope).

    f_i = z_i * H(z_i - theta_i),  z = ReLU(W_enc (x - b_dec) + b_enc),  theta = exp(log_threshold)
    loss = FVU + lambda_t * mean_b sum_i H(z_i - theta_i)

H has zero derivative almost everywhere, so theta learns through straight-through estimators
with a rectangle kernel of bandwidth eps (paper, eqs. 11-12):
    d/dtheta JumpReLU(z) ~= -(theta / eps) * rect((z - theta) / eps)
    d/dtheta H(z - theta) ~= -(1 / eps) * rect((z - theta) / eps)
eps is ``jumprelu_bandwidth`` times the activation scale (1 for activations normalised to
E||x||^2 = d, the paper's units). Thresholds start from data: each latent's threshold is the
(1 - k / L) quantile of its pre-activations on the init sample, so training starts near L0 = k
(``sae.k`` is the initial L0 target; ``l0_coefficient`` then sets the trade-off), and the
encoder is rescaled so the initial reconstruction is the least-squares fit to the sample.

Training step without a dense backward: the dense pre-activations are computed without autograd and
only the entries that can carry gradient are kept, the active ones (z > theta) and those in the
straight-through band (|z - theta| < eps / 2), in bags of slots
(:func:`sae_kernels.jumprelu.threshold_select`). Their pre-activations get the
sparse encoder gradient (:func:`sae_kernels.gather_encode`), the JumpReLU and its estimators act
per slot (:func:`sae_kernels.jumprelu.jumprelu_slots`) and the codes decode sparsely
(:func:`sae_kernels.sparse_decode`, whose backward gives dL/df at band slots too). Losses and
gradients equal the dense path's (:meth:`JumpReLUSAE.forward_dense`, the reference, or set
``dense_backward = True``) up to summation order. ``forward`` returns the codes as
:class:`SparseCodes` [B, M] (each token's active latents, M = the most of one token, 0-padded);
``encode`` returns dense [B, L] codes, and ``decode`` takes either.
"""

from __future__ import annotations

import math

import torch
from sae_kernels import gather_encode, sparse_decode
from sae_kernels.jumprelu import candidate_floor, jumprelu_slots, threshold_select, token_codes
from torch import Tensor, nn

from .base import Codes, ForwardOutput, SparseCodes, VarianceFn, fvu
from .config import SAEConfig
from .dense import DenseCodeSAE, activation_scale
from .precision import reusable
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


def threshold_lr_scale(cfg: SAEConfig, d_enc: int) -> float:
    """``sae.threshold_lr_scale``, resolved for an encoder reading ``d_enc`` features (null:
    sqrt(d_enc) for transcoders, 1 for SAEs)."""
    scale = cfg.threshold_lr_scale
    if scale is None:
        return math.sqrt(d_enc) if cfg.transcode else 1.0
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"sae.threshold_lr_scale={scale} must be a positive number (or null for the default)")
    return float(scale)


def threshold_groups(module: nn.Module, lr: float, d_enc: int) -> list[dict]:
    """Adam groups: the log-thresholds at ``threshold_lr_scale`` times ``lr``, the rest at ``lr``."""
    scale = threshold_lr_scale(module.cfg, d_enc)
    if scale == 1.0:  # one group, as before the scale existed (its checkpoints resume)
        return [{"params": list(module.parameters()), "lr": lr}]
    th = module.log_threshold
    rest = [p for p in module.parameters() if p is not th]
    return [{"params": rest, "lr": lr}, {"params": [th], "lr": lr * scale}]


@register("jumprelu")
class JumpReLUSAE(DenseCodeSAE):
    sparsity_penalty = True
    #: Train through the dense [B, L] autograd graph (:meth:`forward_dense`, the reference).
    dense_backward: bool = False

    def __init__(self, cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
        super().__init__(cfg, d_in, d_out, seed=seed)
        if cfg.jumprelu_bandwidth <= 0 or cfg.jumprelu_init_threshold <= 0:
            raise ValueError(
                f"sae.jumprelu_bandwidth={cfg.jumprelu_bandwidth} and sae.jumprelu_init_threshold="
                f"{cfg.jumprelu_init_threshold} must be positive"
            )
        if not 0 < cfg.k < self.num_latents:
            raise ValueError(f"sae.k={cfg.k} (initial L0 target) must be in [1, num_latents={self.num_latents})")
        threshold_lr_scale(cfg, d_in)  # validated at build time
        init = math.log(cfg.jumprelu_init_threshold)
        self.log_threshold = nn.Parameter(torch.full((self.num_latents,), init))
        self.register_buffer("act_scale", torch.tensor(1.0))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def jumprelu_thresholds(self) -> Tensor:
        return self.threshold.detach()

    def sparsity_rule(self) -> str:
        t = self.threshold.detach()
        return (f"per-latent thresholds (median {t.median().item():.4g}, "
                f"range {t.min().item():.4g}..{t.max().item():.4g})")

    def optimizer_groups(self, lr: float) -> list[dict]:
        return threshold_groups(self, lr, self.d_in)

    @property
    def bandwidth(self) -> float:
        return self.cfg.jumprelu_bandwidth * float(self.act_scale)

    @torch.no_grad()
    def init_from_data(self, x_sample_ND: Tensor, y_sample_NE: Tensor | None = None) -> None:
        super().init_from_data(x_sample_ND, y_sample_NE)
        # Bandwidth and threshold floor are in pre-activation units: the encoder's input scale (a
        # transcoder's target may be orders of magnitude smaller than its input).
        self.act_scale.copy_(activation_scale(x_sample_ND))
        z = self.pre_activations(self.encoder_input(x_sample_ND.float())).relu()
        q = torch.quantile(z, 1.0 - self.cfg.k / self.num_latents, dim=0) if z.shape[0] > 1 else z[0]
        floor = self.cfg.jumprelu_init_threshold * float(self.act_scale)
        self.log_threshold.copy_(q.clamp_min(floor).log())
        # Rescale the encoder (and thresholds with it, so the active set is unchanged) by the
        # least-squares factor that fits the initial reconstruction to the sample: training then
        # starts at FVU <= 1 instead of spending its first steps shrinking the encoder, which
        # would push pre-activations under thresholds that move only multiplicatively.
        y = (x_sample_ND if y_sample_NE is None else y_sample_NE).float() - self.b_dec
        f = _JumpReLU.apply(z, self.threshold, self.bandwidth)
        y_hat = f @ self.W_dec
        scale = (y_hat * y).sum() / y_hat.pow(2).sum().clamp_min(1e-12)
        if scale > 0:
            self.W_enc.mul_(scale)
            self.b_enc.mul_(scale)
            self.log_threshold.add_(scale.log())

    def activation(self, pre_BL: Tensor) -> Tensor:
        return _JumpReLU.apply(pre_BL.relu(), self.threshold, self.bandwidth)

    def decode(self, codes: Codes) -> Tensor:
        """Dense [B, L] codes (``encode``) or the :class:`SparseCodes` that ``forward`` returns."""
        if isinstance(codes, SparseCodes):
            return sparse_decode(codes.idx, codes.vals, self.W_dec, self.b_dec)
        return super().decode(codes)

    def forward(self, x_BD: Tensor, y_BE: Tensor | None = None, *, dead_mask: Tensor | None = None,
                sparsity_scale: float = 1.0, variance_fn: VarianceFn | None = None) -> ForwardOutput:
        if self.dense_backward:
            return self.forward_dense(x_BD, y_BE, sparsity_scale=sparsity_scale, variance_fn=variance_fn)
        y_BE = self.check_input(x_BD, y_BE)
        x_in = self.encoder_input(x_BD)
        theta, eps = self.threshold, self.bandwidth
        with torch.no_grad():
            slots = threshold_select(self.pre_activations_nograd(x_in), candidate_floor(theta, eps))
        # Bags of slots (several per token when it keeps many entries): inputs gathered per bag,
        # bag reconstructions summed per token.
        pre = gather_encode(x_in.index_select(0, slots.token), self.W_enc, self.b_enc, slots.idx, slots.vals)
        f, l0 = jumprelu_slots(pre, theta, slots.idx, slots.valid, eps, num_tokens=x_BD.shape[0])
        decoded = sparse_decode(slots.idx, f, self.W_dec)
        x_hat = decoded.new_zeros(x_BD.shape[0], self.d_out).index_add(0, slots.token, decoded) + self.b_dec
        skip = self.skip(x_BD)
        if skip is not None:
            x_hat = x_hat + skip
        rec = fvu(x_hat, y_BE, variance_fn)
        loss = rec + self.cfg.l0_coefficient * sparsity_scale * l0
        codes = SparseCodes(*token_codes(f, slots, x_BD.shape[0]))
        return ForwardOutput(x_hat, codes, {"fvu": rec, "l0": l0, "loss": loss})

    def forward_dense(self, x_BD: Tensor, y_BE: Tensor | None = None, *, sparsity_scale: float = 1.0,
                      variance_fn: VarianceFn | None = None) -> ForwardOutput:
        """The reference: autograd through dense [B, L] pre-activations and codes (a dense backward)."""
        y_BE = self.check_input(x_BD, y_BE)
        z = self.pre_activations(self.encoder_input(x_BD)).relu()
        theta, eps = self.threshold, self.bandwidth
        f = _JumpReLU.apply(z, theta, eps)
        x_hat = self.reconstruct(x_BD, f)
        rec = fvu(x_hat, y_BE, variance_fn)
        l0 = _Step.apply(z, theta, eps).sum(-1).mean()
        loss = rec + self.cfg.l0_coefficient * sparsity_scale * l0
        return ForwardOutput(x_hat, f, {"fvu": rec, "l0": l0, "loss": loss})

    @torch.no_grad()
    def pre_activations_nograd(self, x_in_BD: Tensor) -> Tensor:
        """Dense pre-activations [B, L] without autograd, valid until the next call.

        On CPU outside autocast they are written into a reused workspace: a fresh [B, L] buffer per
        step is large enough to be mmap-ed and page-faulted anew each time (see ``TopKSAE``).
        """
        if x_in_BD.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return self.pre_activations(x_in_BD)
        shape = (x_in_BD.shape[0], self.num_latents)
        ws = self.__dict__["_pre_workspace"] = reusable(self.__dict__.get("_pre_workspace"), shape, x_in_BD.dtype)
        return torch.addmm(self.b_enc, x_in_BD, self.W_enc.T, out=ws)
