"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z = TopK(ReLU(W_enc (x - b_dec) + b_enc)),   x_hat = W_dec^T z + b_dec

Loss: FVU + auxk_alpha * AuxK, where AuxK (sec. A.2) reconstructs the residual ``y - x_hat``
with the k_aux largest pre-activations among dead latents, normalised like FVU and scaled by
min(1, n_dead / k_aux). Dense pre-activations are computed without autograd; gradients reach
W_enc/b_enc through :func:`sae_kernels.gather_encode` and W_dec through
:func:`sae_kernels.sparse_decode`, so no [B, L] tensor lies on the gradient path.
"""

from __future__ import annotations

import math

import torch
from sae_kernels import gather_encode, gather_pre_activations, sparse_decode
from torch import Tensor

from .base import Codes, ForwardOutput, SparseCoder, SparseCodes, VarianceFn, fvu
from .config import SAEConfig
from .registry import register

_SELECTION_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@register("topk")
class TopKSAE(SparseCoder):
    def __init__(self, cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
        super().__init__(cfg, d_in, d_out, seed=seed)
        if not 0 < cfg.k < self.num_latents:
            raise ValueError(f"sae.k={cfg.k} must be in [1, num_latents={self.num_latents})")
        self.k = cfg.k
        self.k_aux = cfg.k_aux if cfg.k_aux > 0 else max(1, d_in // 2)
        if cfg.selection_dtype not in _SELECTION_DTYPES:
            raise ValueError(f"sae.selection_dtype={cfg.selection_dtype!r}; use one of {', '.join(_SELECTION_DTYPES)}")

    @torch.no_grad()
    def init_from_data(self, x_sample_ND: Tensor, y_sample_NE: Tensor | None = None) -> None:
        super().init_from_data(x_sample_ND, y_sample_NE)
        if self.cfg.fit_encoder_scale:
            x_in = self.encoder_input(x_sample_ND.float())
            # Per-token top-k (also for BatchTopK: its batch cut would move its threshold estimate).
            vals, idx = self.pre_activations(x_in).topk(self.k, dim=1, sorted=False)
            target = x_sample_ND if y_sample_NE is None else y_sample_NE
            self.scale_encoder_(sparse_decode(idx, vals.relu(), self.W_dec), target.float() - self.b_dec)

    @torch.no_grad()
    def scale_encoder_(self, decoded_NE: Tensor, target_NE: Tensor) -> float:
        """Multiply W_enc and b_enc by ``argmin_s ||s * decoded - target||^2`` when it is positive
        (a positive factor keeps every top-k choice); returns the factor."""
        scale = float((decoded_NE * target_NE).sum() / decoded_NE.pow(2).sum().clamp_min(1e-12))
        if scale > 0 and math.isfinite(scale):
            self.W_enc.mul_(scale)
            self.b_enc.mul_(scale)
        return scale

    # Selection of latents from dense pre-activations; BatchTopK overrides it.
    def select(self, pre_BL: Tensor) -> tuple[Tensor, Tensor]:
        """Return (pre-activation values, indices) of the selected latents, each [B, K]."""
        return pre_BL.topk(self.k, dim=1, sorted=False)

    @torch.no_grad()
    def pre_activations(self, x_in_BD: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Dense pre-activations [B, L], without autograd, in ``dtype`` (default: the input's).

        On CPU outside autocast they are written into a reused workspace: a fresh [B, L] buffer
        per step is large enough to be mmap-ed and page-faulted anew each time, which costs about
        a quarter of the matmul itself. The result is only valid until the next call.
        """
        if dtype is not None and dtype != x_in_BD.dtype:
            W, b, x_in_BD = self.W_enc.to(dtype), self.b_enc.to(dtype), x_in_BD.to(dtype)
        else:
            W, b = self.W_enc, self.b_enc
        if x_in_BD.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return torch.addmm(b, x_in_BD, W.T)
        shape = (x_in_BD.shape[0], self.num_latents)
        ws = self.__dict__.get("_pre_workspace")
        if ws is None or ws.shape != shape or ws.dtype != x_in_BD.dtype:
            ws = torch.empty(shape, dtype=x_in_BD.dtype)
            self.__dict__["_pre_workspace"] = ws
        return torch.addmm(b, x_in_BD, W.T, out=ws)

    def approximate_selection(self, x_in_BD: Tensor) -> bool:
        """Whether latents are selected from lower-precision pre-activations (``sae.selection_dtype``)."""
        dtype = _SELECTION_DTYPES[self.cfg.selection_dtype]
        return dtype != x_in_BD.dtype and x_in_BD.dtype == torch.float32 and \
            not torch.is_autocast_enabled(x_in_BD.device.type)

    @torch.no_grad()
    def selection_scores(self, x_in_BD: Tensor) -> Tensor:
        """The dense [B, L] scores that latents are selected from: exact pre-activations, or
        their ``sae.selection_dtype`` approximation (see :meth:`exact_values`)."""
        approx = self.approximate_selection(x_in_BD)
        return self.pre_activations(x_in_BD, _SELECTION_DTYPES[self.cfg.selection_dtype] if approx else None)

    def select_latents(self, x_in_BD: Tensor, scores_BL: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`select` on the selection scores, with full-precision values (no autograd)."""
        vals, idx = self.select(scores_BL)
        return self.exact_values(x_in_BD, idx, vals), idx

    def exact_values(self, x_in_BD: Tensor, idx_BK: Tensor, vals_BK: Tensor) -> Tensor:
        """Selected pre-activation values in full precision: ``vals_BK`` itself after an exact
        selection, else recomputed at the selected indices (O(B K D)); slots whose selected
        value is exactly 0 (unused slots) stay 0."""
        if not self.approximate_selection(x_in_BD):
            return vals_BK
        exact = gather_pre_activations(x_in_BD, self.W_enc, self.b_enc, idx_BK)
        return exact.where(vals_BK != 0, 0.0)

    def encode(self, x_BD: Tensor) -> SparseCodes:
        self.check_x(x_BD)
        x_in = self.encoder_input(x_BD)
        with torch.no_grad():
            vals, idx = self.select_latents(x_in, self.selection_scores(x_in))
        return SparseCodes(vals.relu(), idx)

    def decode(self, codes: Codes) -> Tensor:
        if not isinstance(codes, SparseCodes):
            raise TypeError(f"{type(self).__name__}.decode expects SparseCodes, got dense codes")
        return sparse_decode(codes.idx, codes.vals, self.W_dec, self.b_dec)

    def forward(self, x_BD: Tensor, y_BE: Tensor | None = None, *, dead_mask: Tensor | None = None,
                sparsity_scale: float = 1.0, variance_fn: VarianceFn | None = None) -> ForwardOutput:
        y_BE = self.check_input(x_BD, y_BE)
        x_in = self.encoder_input(x_BD)
        pre = self.selection_scores(x_in)
        with torch.no_grad():
            pre_vals, idx = self.select_latents(x_in, pre)
        vals = gather_encode(x_in, self.W_enc, self.b_enc, idx, pre_vals).relu()
        codes = SparseCodes(vals, idx)
        x_hat = self.reconstruct(x_BD, codes)
        losses = {"fvu": fvu(x_hat, y_BE, variance_fn)}
        loss = losses["fvu"]
        if dead_mask is not None and self.cfg.auxk_alpha > 0:
            auxk = self.auxk_loss(x_in, pre, dead_mask, (y_BE - x_hat).detach(), variance_fn)
            if auxk is not None:
                losses["auxk"] = auxk
                loss = loss + self.cfg.auxk_alpha * auxk
        losses["loss"] = loss
        return ForwardOutput(x_hat, codes, losses)

    def auxk_loss(self, x_in_BD: Tensor, pre_BL: Tensor, dead_mask_L: Tensor, residual_BE: Tensor,
                  variance_fn: VarianceFn | None = None) -> Tensor | None:
        """AuxK loss, or None when no latent is dead."""
        dead_idx = dead_mask_L.nonzero().squeeze(1)
        num_dead = dead_idx.numel()
        if num_dead == 0:
            return None
        k_aux = min(self.k_aux, num_dead)
        with torch.no_grad():
            # Only the dead columns: [B, n_dead], small when few latents are dead.
            aux_pre, aux_pos = pre_BL.index_select(1, dead_idx).topk(k_aux, dim=1, sorted=False)
            aux_idx = dead_idx[aux_pos]
            aux_pre = self.exact_values(x_in_BD, aux_idx, aux_pre)
        aux_vals = gather_encode(x_in_BD, self.W_enc, self.b_enc, aux_idx, aux_pre).relu()
        e_hat = sparse_decode(aux_idx, aux_vals, self.W_dec)
        scale = min(num_dead / self.k_aux, 1.0)
        return scale * fvu(e_hat, residual_BE, variance_fn)
