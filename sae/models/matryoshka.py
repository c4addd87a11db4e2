"""Matryoshka SAEs (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders"; Nabeshima 2024, "Matryoshka Sparse Autoencoders").

The latents are split into nested groups ``sae.matryoshka_groups`` (in index order); prefix m is
the union of groups 0..m. Selection is unchanged (TopK per token or BatchTopK over the batch),
but every prefix must reconstruct the input on its own:

    loss = sum_m FVU(y, b_dec + sum_{i < w_m} z_i W_dec_i) + auxk_alpha * AuxK

where w_m is the width of prefix m (the last prefix is the whole SAE). The early latents then
cannot rely on later ones to fill in what they leave out, so a general feature (a parent) keeps a
latent of its own instead of being absorbed into the latents of its specific cases (children).
At inference a Matryoshka SAE is a plain TopK / BatchTopK SAE (SAELens saves the BatchTopK form
as a JumpReLU with a threshold), so encode/decode, export and evaluation are inherited.

Each prefix's reconstruction comes from the selected latents only: the codes of group g are the
selected values masked to indices in [w_{g-1}, w_g), decoded sparsely (sparse backward), and the
prefix reconstructions are their running sum. Cost per step: one sparse decode per group, each
O(B K E), beside the O(B L D) selection GEMM.
"""

from __future__ import annotations

import itertools

import torch
from sae_kernels import sparse_decode
from torch import Tensor

from .base import ForwardOutput, SparseCodes, VarianceFn, fvu
from .batchtopk import BatchTopKSAE
from .config import SAEConfig
from .registry import register
from .topk import TopKSAE

#: Most prefixes the default grouping makes (widths L/32 ... L/2, L).
DEFAULT_MAX_PREFIXES = 6


def default_groups(num_latents: int, k: int) -> list[int]:
    """Halving groups: prefix widths L/2^m, ..., L/4, L/2, L with the narrowest at least ``k``
    (and at least 1), at most :data:`DEFAULT_MAX_PREFIXES` prefixes."""
    widths = [num_latents]
    while len(widths) < DEFAULT_MAX_PREFIXES and widths[0] // 2 >= max(k, 1):
        widths.insert(0, widths[0] // 2)
    return [w - p for p, w in zip([0, *widths[:-1]], widths)]


def resolve_groups(cfg: SAEConfig, num_latents: int) -> list[int]:
    """The group sizes of ``cfg`` for an SAE of ``num_latents`` latents.

    Raises:
        ValueError: a non-positive group, or sizes that do not sum to ``num_latents``.
    """
    groups = [int(g) for g in cfg.matryoshka_groups] or default_groups(num_latents, cfg.k)
    if any(g <= 0 for g in groups) or sum(groups) != num_latents:
        raise ValueError(
            f"sae.matryoshka_groups={groups} must be positive latent counts summing to the number of latents "
            f"({num_latents}); e.g. sae.matryoshka_groups=[{num_latents // 4},{num_latents // 4},{num_latents // 2}], "
            "or [] for halving groups")
    return groups


class _Matryoshka:
    """The nested-prefix loss, mixed into TopK and BatchTopK."""

    def sparsity_rule(self) -> str:
        return super().sparsity_rule() + f"; Matryoshka groups {self.groups} (loss summed over nested prefixes)"

    def _init_groups(self) -> None:
        self.groups = resolve_groups(self.cfg, self.num_latents)
        #: Prefix widths w_0 < w_1 < ... < w_last = L (computed on the host: builds on the meta device too).
        self.prefix_widths = list(itertools.accumulate(self.groups))
        self.register_buffer("group_bounds", torch.tensor([0, *self.prefix_widths]), persistent=False)

    def prefix_reconstructions(self, codes: SparseCodes) -> list[Tensor]:
        """[B, E] reconstruction of every prefix but the last (the whole SAE), narrowest first."""
        group = torch.bucketize(codes.idx, self.group_bounds[1:], right=True)  # [B, K] group of each slot
        out, running = [], self.b_dec
        for g in range(len(self.groups) - 1):
            vals = codes.vals * (group == g)
            running = running + sparse_decode(codes.idx, vals, self.W_dec)
            out.append(running)
        return out

    def forward(self, x_BD: Tensor, y_BE: Tensor | None = None, *, dead_mask: Tensor | None = None,
                sparsity_scale: float = 1.0, variance_fn: VarianceFn | None = None) -> ForwardOutput:
        out = super().forward(x_BD, y_BE, dead_mask=dead_mask, sparsity_scale=sparsity_scale, variance_fn=variance_fn)
        y = x_BD if y_BE is None else y_BE
        losses = dict(out.losses)
        inner = []
        skip = self.skip(x_BD) if len(self.groups) > 1 else None
        for width, y_hat in zip(self.prefix_widths, self.prefix_reconstructions(out.codes)):
            losses[f"fvu_prefix_{width}"] = f = fvu(y_hat if skip is None else y_hat + skip, y, variance_fn)
            inner.append(f)
        if inner:
            losses["loss"] = losses["loss"] + torch.stack(inner).sum()
        return ForwardOutput(out.x_hat, out.codes, losses)


@register("matryoshka_topk")
class MatryoshkaTopKSAE(_Matryoshka, TopKSAE):
    latent_parallel = False  # the prefix losses are not implemented across ranks
    export_form = "topk"

    def __init__(self, cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
        super().__init__(cfg, d_in, d_out, seed=seed)
        self._init_groups()


@register("matryoshka_batchtopk")
class MatryoshkaBatchTopKSAE(_Matryoshka, BatchTopKSAE):
    export_form = "batchtopk"

    def __init__(self, cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
        super().__init__(cfg, d_in, d_out, seed=seed)
        self._init_groups()

    @property
    def default_lr_scale(self) -> float:
        """2 for a transcoder. Its decoder grows from zero, and the latents of the wide groups, chosen
        rarely in the batch-wide selection, got too few steps to grow: on SmolLM2's MLP (4608
        latents, 300 steps) 13.1% stayed dead, 22% of the widest group, each with half the decoder
        norm of a live one; at twice the rule's rate 1.6% dead and FVU 0.152 instead of 0.198."""
        return 2.0 if self.cfg.transcode else 1.0
