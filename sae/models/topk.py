"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z = TopK(ReLU(W_enc (x - b_dec) + b_enc)),   x_hat = W_dec^T z + b_dec

Loss: FVU + auxk_alpha * AuxK, where AuxK (sec. A.2) reconstructs the residual ``y - x_hat``
with the k_aux largest pre-activations among dead latents, normalised like FVU and scaled by
min(1, n_dead / k_aux). Dense pre-activations are computed without autograd; codes, reconstruction
and squared error come from :func:`sae_kernels.sparse_autoencode`, whose backward is sparse, so no
[B, L] tensor lies on the gradient path.

Selection precision (``sae.selection_dtype``): latents may be chosen from bf16 pre-activations
(``auto`` does so where the hardware multiplies bf16 natively, see :mod:`.precision`); the chosen
values are then recomputed in fp32 (O(B K D)), so codes and gradients stay exact for the choice.
"""

from __future__ import annotations

import math

import torch
from sae_kernels import gather_encode, gather_pre_activations, sparse_decode
from sae_kernels.autoencode import sparse_autoencode
from sae_kernels.topk_select import topk
from torch import Tensor

from .base import Codes, ForwardOutput, LocalLatents, SparseCoder, SparseCodes, VarianceFn, fvu, fvu_from_error
from .config import SAEConfig
from .precision import WeightCopy, resolve_selection_dtype, reusable, validate_selection_dtype
from .registry import register


@register("topk")
class TopKSAE(SparseCoder):
    latent_parallel = True  # the exact global top-k over ranks (forward_with)

    def sparsity_rule(self) -> str:
        return f"k = {self.k} latents per token"

    def __init__(self, cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
        super().__init__(cfg, d_in, d_out, seed=seed)
        if not 0 < cfg.k < self.num_latents:
            raise ValueError(f"sae.k={cfg.k} must be in [1, num_latents={self.num_latents})")
        self.k = cfg.k
        self.k_aux = cfg.k_aux if cfg.k_aux > 0 else max(1, d_in // 2)
        validate_selection_dtype(cfg.selection_dtype)
        # bf16 copy of W_enc for the selection GEMM, cast only when W_enc changed (see WeightCopy).
        self.__dict__["_W_enc_lowp"] = WeightCopy(torch.bfloat16)

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
        return topk(pre_BL, self.k)

    @torch.no_grad()
    def pre_activations(self, x_in_BD: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Dense pre-activations [B, L], without autograd, in ``dtype`` (default: the input's).

        On CPU outside autocast they are written into a reused workspace: a fresh [B, L] buffer
        per step is large enough to be mmap-ed and page-faulted anew each time, which costs about
        a quarter of the matmul itself. The result is only valid until the next call.
        """
        if dtype is not None and dtype != x_in_BD.dtype:
            W = self.lowp_copies()[self.W_enc].get(self.W_enc) if dtype == torch.bfloat16 else self.W_enc.to(dtype)
            b, x_in_BD = self.b_enc.to(dtype), x_in_BD.to(dtype)
        else:
            W, b = self.W_enc, self.b_enc
        if x_in_BD.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
            return torch.addmm(b, x_in_BD, W.T)
        shape = (x_in_BD.shape[0], self.num_latents)
        ws = self.__dict__["_pre_workspace"] = reusable(self.__dict__.get("_pre_workspace"), shape, x_in_BD.dtype)
        return torch.addmm(b, x_in_BD, W.T, out=ws)

    def lowp_copies(self) -> dict[Tensor, WeightCopy]:
        """Parameters the selection reads in lower precision, with their cached copies (a fused
        optimiser step refreshes them as it writes the parameters)."""
        return {self.W_enc: self.__dict__["_W_enc_lowp"]}

    def selection_dtype(self, device: torch.device) -> torch.dtype:
        """``sae.selection_dtype`` resolved for ``device`` (``auto``: bf16 where native)."""
        return resolve_selection_dtype(self.cfg.selection_dtype, device)

    def approximate_selection(self, x_in_BD: Tensor) -> bool:
        """Whether latents are selected from lower-precision pre-activations (``sae.selection_dtype``)."""
        if x_in_BD.dtype != torch.float32 or torch.is_autocast_enabled(x_in_BD.device.type):
            return False
        return self.selection_dtype(x_in_BD.device) != torch.float32

    @torch.no_grad()
    def selection_scores(self, x_in_BD: Tensor) -> Tensor:
        """The dense [B, L] scores that latents are selected from: exact pre-activations, or
        their ``sae.selection_dtype`` approximation (see :meth:`exact_values`)."""
        approx = self.approximate_selection(x_in_BD)
        return self.pre_activations(x_in_BD, self.selection_dtype(x_in_BD.device) if approx else None)

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
        vals, x_hat, err_sq = sparse_autoencode(
            x_BD, idx, pre_vals, self.W_enc, self.b_enc, self.W_dec, self.b_dec, b_pre_D=self.pre_encoder_bias(),
            x_in_BD=x_in, offset_BE=self.skip(x_BD), y_BE=y_BE)
        codes = SparseCodes(vals, idx)
        auxk = None
        if dead_mask is not None and self.cfg.auxk_alpha > 0:
            auxk = self.auxk_loss(x_BD, x_in, pre, dead_mask, (y_BE - x_hat).detach(), variance_fn)
        return ForwardOutput(x_hat, codes, self._losses(fvu_from_error(err_sq, y_BE, variance_fn), auxk))

    def _losses(self, fvu_loss: Tensor, auxk: Tensor | None) -> dict[str, Tensor]:
        """The named loss terms: FVU, AuxK (when some latent is dead) and their weighted sum."""
        losses = {"fvu": fvu_loss}
        if auxk is not None:
            losses["auxk"] = auxk
        losses["loss"] = fvu_loss if auxk is None else fvu_loss + self.cfg.auxk_alpha * auxk
        return losses

    # --- latent parallelism: the exact global top-k over ranks (Gao et al. 2024, sec. 5) ------------
    def forward_with(self, latents: LocalLatents, x_BD: Tensor, y_BE: Tensor | None = None, *,
                     dead_mask: Tensor | None = None, sparsity_scale: float = 1.0,
                     variance_fn: VarianceFn | None = None) -> ForwardOutput:
        """:meth:`forward` with this process holding a slice of the latents (``train.parallel=latent``):
        every rank proposes its local top-k of each token, ``latents.topk`` keeps the exact global
        top-k of the gathered candidates (slots other ranks own add nothing here: index 0, value 0,
        no gradient as relu'(0) = 0), and the partial reconstructions are summed over ranks. So codes,
        losses and each slice's gradients equal one process's (tests/distributed)."""
        if latents.local:
            return self.forward(x_BD, y_BE, dead_mask=dead_mask, sparsity_scale=sparsity_scale,
                                variance_fn=variance_fn)
        y_BE = self.check_input(x_BD, y_BE)
        x_in = latents.copy_in(self.encoder_input(x_BD))
        pre = self.selection_scores(x_in)
        idx, pre_vals = _owned(*latents.topk(pre, self.k))
        pre_vals = self.exact_values(x_in, idx, pre_vals)
        vals = gather_encode(x_in, self.W_enc, self.b_enc, idx, pre_vals).relu()
        x_hat = latents.reduce(sparse_decode(idx, vals, self.W_dec)) + self.b_dec
        skip = self.skip(x_BD)
        if skip is not None:
            x_hat = x_hat + skip
        auxk = None
        if dead_mask is not None and self.cfg.auxk_alpha > 0:
            auxk = self._auxk_with(latents, x_in, pre, dead_mask, (y_BE - x_hat).detach(), variance_fn)
        return ForwardOutput(x_hat, SparseCodes(vals, idx), self._losses(fvu(x_hat, y_BE, variance_fn), auxk))

    def _auxk_with(self, latents: LocalLatents, x_in_BD: Tensor, pre_BL: Tensor, dead_mask_L: Tensor,
                   residual_BE: Tensor, variance_fn: VarianceFn | None) -> Tensor | None:
        """AuxK with the exact global top-k_aux among the dead latents of every rank."""
        n_dead = latents.count(int(dead_mask_L.sum()))
        if n_dead == 0:
            return None
        with torch.no_grad():
            masked = pre_BL.masked_fill(~dead_mask_L, -math.inf)
        idx, vals = _owned(*latents.topk(masked, min(self.k_aux, n_dead)))
        vals = self.exact_values(x_in_BD, idx, torch.where(torch.isinf(vals), torch.zeros_like(vals), vals))
        aux_vals = gather_encode(x_in_BD, self.W_enc, self.b_enc, idx, vals).relu()
        e_hat = latents.reduce(sparse_decode(idx, aux_vals, self.W_dec))
        return min(n_dead / self.k_aux, 1.0) * fvu(e_hat, residual_BE, variance_fn)

    @torch.no_grad()
    def init_from_data_with(self, latents: LocalLatents, x_sample_ND: Tensor,
                            y_sample_NE: Tensor | None = None) -> None:
        """:meth:`init_from_data` with a slice of the latents here: every rank holds the same sample,
        so ``b_dec`` is the same everywhere and the encoder scale is fitted to the global
        reconstruction, as with all latents in one process."""
        if latents.local or not self.cfg.fit_encoder_scale:
            self.init_from_data(x_sample_ND, y_sample_NE)
            return
        SparseCoder.init_from_data(self, x_sample_ND, y_sample_NE)  # b_dec (the scale is fitted below)
        x_in = self.encoder_input(x_sample_ND.float())
        idx, vals = _owned(*latents.topk(self.pre_activations(x_in), self.k))
        decoded = latents.reduce(sparse_decode(idx, vals.relu(), self.W_dec))
        target = x_sample_ND if y_sample_NE is None else y_sample_NE
        self.scale_encoder_(decoded, target.float() - self.b_dec)

    def pre_encoder_bias(self) -> Tensor | None:
        """``b_dec`` when it is subtracted from the input before encoding (SAEs), else None."""
        return self.b_dec if self.apply_b_dec_to_input else None

    def auxk_loss(self, x_BD: Tensor, x_in_BD: Tensor, pre_BL: Tensor, dead_mask_L: Tensor, residual_BE: Tensor,
                  variance_fn: VarianceFn | None = None) -> Tensor | None:
        """AuxK loss, or None when no latent is dead. ``x_in`` is the encoder input of ``x``."""
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
        _, _, err_sq = sparse_autoencode(x_BD, aux_idx, aux_pre, self.W_enc, self.b_enc, self.W_dec,
                                         b_pre_D=self.pre_encoder_bias(), x_in_BD=x_in_BD, y_BE=residual_BE)
        scale = min(num_dead / self.k_aux, 1.0)
        return scale * fvu_from_error(err_sq, residual_BE, variance_fn)


def _owned(vals_BK: Tensor, idx_BK: Tensor, own_BK: Tensor | None) -> tuple[Tensor, Tensor]:
    """(indices, values) of a selection with the slots another rank owns zeroed."""
    if own_BK is None:
        return idx_BK, vals_BK
    return idx_BK, torch.where(own_BK, vals_BK, torch.zeros_like(vals_BK))
