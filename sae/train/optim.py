"""The fused optimiser step: decoder-gradient projection, clipping, Adam and decoder renormalisation.

The unfused sequence of a training step after backward (Gao et al. 2024, sec. A.5) is

    g_dec -= <g_dec, W_dec[l]> W_dec[l]      (remove the part of each row's gradient along the row)
    g *= min(1, max_norm / ||g||)           (clip the global gradient norm)
    Adam                                     (torch.optim.Adam)
    W_dec[l] /= ||W_dec[l]||                 (back to unit-norm decoder rows)

and reads and writes every large weight and gradient three to four times. :class:`SAEAdam`
does it in two passes: one read of each gradient (and of W_dec) for the per-row dots and the
squared norms, then one read-modify-write of (param, grad, exp_avg, exp_avg_sq) per weight
that projects, scales by the clipping factor (kept on the device: no host sync), updates and
renormalises (:func:`sae_kernels.triton_fused.adam_rows_`). It also refreshes the bf16 copy of
W_enc that bf16 selection reads, in the same pass.

It is a :class:`torch.optim.Adam` with the same state (``exp_avg``, ``exp_avg_sq``, ``step``),
so checkpoints move freely between it and the unfused path. The result equals the unfused
sequence up to fp32 rounding (tests/train/test_fused_optim.py: 1e-6); ``train.deterministic=true``
keeps the unfused sequence and its bitwise reproducibility.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from sae_kernels.autoencode import fused_ops
from torch import Tensor
from torch.autograd.graph import increment_version

from sae.models.precision import WeightCopy

ADAM_STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

GradSqTotal = Callable[[dict[Tensor, Tensor]], Tensor]
"""Maps each parameter to its gradient's squared norm (device scalars) to the global squared norm
(a strategy sums them, all-reducing the parts of sharded weights)."""


def _sum_sq(parts: dict[Tensor, Tensor]) -> Tensor:
    return torch.stack(list(parts.values())).sum()


class SAEAdam(torch.optim.Adam):
    """Adam fused with the decoder projection, gradient clipping and decoder renormalisation.

    Args:
        params: the SAE's parameters (one group, as :func:`sae.train.schedule.build_optimizer` makes).
        decoder: the decoder weight ``W_dec`` [L, E] whose rows are kept at unit norm, or None.
        max_grad_norm: clip the global gradient norm to this (<= 0: no clipping).
        grad_sq_total: how per-parameter squared norms combine (default: their sum).
        lowp_copies: low-precision copies of parameters to refresh in the update pass.
        state_dtype: dtype of exp_avg / exp_avg_sq (bfloat16 halves their memory).
    """

    fuses_decoder_step = True

    def __init__(self, params: Iterable[Tensor], *, lr: float, betas: tuple[float, float], eps: float,
                 decoder: Tensor | None, max_grad_norm: float, grad_sq_total: GradSqTotal | None = None,
                 lowp_copies: dict[Tensor, WeightCopy] | None = None, state_dtype: torch.dtype = torch.float32):
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=False)
        self.decoder = decoder
        self.max_grad_norm = max_grad_norm
        self.grad_sq_total = grad_sq_total or _sum_sq
        self.lowp_copies = lowp_copies or {}
        self.state_dtype = state_dtype

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.contiguous_format)
        elif state["step"].device.type != "cpu":  # from a fused/capturable torch Adam: once, then host-side
            state["step"] = state["step"].cpu()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts states to the parameter dtype on load
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].dtype != self.state_dtype:
                    state[key] = state[key].to(self.state_dtype)

    @torch.no_grad()
    def clip_coefficient(self, params: list[Tensor]) -> tuple[Tensor, Tensor | None]:
        """(``min(1, max_norm / (||g|| + 1e-6))`` as a 1-element device tensor, the decoder's
        per-row dots ``<g[l], W_dec[l]>`` or None)."""
        dots, sq = None, {}
        for p in params:
            if p is self.decoder:
                dots, rows = fused_ops(p.device).row_grad_stats(p.grad, p)
                sq[p] = rows.sum()
            elif self.max_grad_norm > 0:
                sq[p] = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        if self.max_grad_norm <= 0 or not sq:
            return torch.ones(1, device=params[0].device), dots
        norm = self.grad_sq_total(sq).sqrt()
        return (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0).reshape(1).float(), dots

    def hyperparameters(self, group: dict, t: int, lr: float | None = None) -> tuple[float, float]:
        """(step_size, bc2_sqrt) of Adam step number ``t`` (1-based): ``lr / (1 - beta1^t)``, ``sqrt(1 - beta2^t)``."""
        beta1, beta2 = group["betas"]
        return (group["lr"] if lr is None else lr) / (1 - beta1**t), math.sqrt(1 - beta2**t)

    def host_step(self, params: list[Tensor]) -> dict[Tensor, tuple[float, float]]:
        """The host's part of a step: advance each parameter's step count (creating its state on
        the first step); returns each parameter's (step_size, bc2_sqrt)."""
        out = {}
        for group in self.param_groups:
            members = {id(p) for p in group["params"]}
            for p in params:
                if id(p) in members:
                    state = self._state(p)
                    state["step"] += 1
                    out[p] = self.hyperparameters(group, int(state["step"]))
        return out

    @torch.no_grad()
    def device_step(self, params: list[Tensor], hyper: dict[Tensor, tuple[float, float]] | Tensor) -> None:
        """The device's part of a step (every kernel, no host sync): clip factor, decoder dots, and
        one fused update per parameter. ``hyper``: per-parameter (step_size, bc2_sqrt) floats, or one
        device tensor ``[step_size, bc2_sqrt]`` for all (what a captured CUDA graph reads)."""
        coef, dots = self.clip_coefficient(params)
        eps = {id(p): g["eps"] for g in self.param_groups for p in g["params"]}
        betas = {id(p): g["betas"] for g in self.param_groups for p in g["params"]}
        for p in params:
            if p.grad.is_sparse:
                raise ValueError("SAEAdam does not take sparse gradients")
            state = self.state[p]
            ss, bc = (hyper, None) if isinstance(hyper, Tensor) else hyper[p]
            kw = dict(beta1=betas[id(p)][0], beta2=betas[id(p)][1], step_size=ss, bc2_sqrt=bc, eps=eps[id(p)])
            copy = self.lowp_copies.get(p)
            shadow = copy.buffer(p) if copy is not None else None
            ops = fused_ops(p.device)
            grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
            if p is self.decoder:
                ops.adam_rows_(p, grad, state["exp_avg"], state["exp_avg_sq"], coef, dots, renorm=True,
                               norm_eps=torch.finfo(p.dtype).eps, shadow=shadow, **kw)
            else:
                ops.adam_flat_(p, grad, state["exp_avg"], state["exp_avg_sq"], coef, shadow=shadow, **kw)
            increment_version(p)  # the Triton kernels write through pointers
            if copy is not None:
                copy.mark_fresh(p)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SAEAdam.step takes no closure")
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if params:
            self.device_step(params, self.host_step(params))
        return None
