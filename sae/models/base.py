"""The contract every sparse coder (SAE or transcoder) keeps, and the parts they share.

A sparse coder maps an input ``x_BD`` (hook point activations) to codes over L latents and
decodes them to ``x_hat_BE`` approximating a target ``y_BE`` (``y = x`` for an SAE; another
hook point for a transcoder). ``forward`` returns a :class:`ForwardOutput`.

Models are rank-agnostic and do no I/O: the trainer owns data, devices and parallelism.
Shape legend: B tokens, D d_in, E d_out (= D for SAEs), L latents, K k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
from sae_kernels.topk_select import topk
from torch import Tensor, nn

from .config import SAEConfig


class SparseCodes(NamedTuple):
    """Codes of the TopK family, kept sparse."""

    vals: Tensor
    """[B, K] activation of each selected latent (zero where a slot is unused)."""
    idx: Tensor
    """[B, K] index of each selected latent in [0, L)."""


Codes = SparseCodes | Tensor  # dense codes are [B, L]


class ForwardOutput(NamedTuple):
    """What ``forward`` returns."""

    x_hat: Tensor
    """[B, E] reconstruction of the target."""
    codes: Codes
    """Sparse codes (TopK family) or dense [B, L] codes (ReLU, JumpReLU)."""
    losses: dict[str, Tensor]
    """Named scalar loss terms; ``losses["loss"]`` is the total to minimise."""


VarianceFn = Callable[[Tensor], Tensor]
"""Maps a target batch [B, E] to its total variance per token (a detached scalar)."""


@torch.no_grad()
def token_variance(y_BE: Tensor) -> Tensor:
    """Total variance per token about the batch mean: sum_b ||y_b - mean(y)||^2 / B.

    Data-parallel training passes a variance function that computes the same statistic over the
    union of all ranks' batches, which makes the sum of per-rank losses equal the loss of one
    process on the union (see ``sae.train.strategy``).
    """
    y = y_BE.float()
    return (y - y.mean(0)).pow(2).sum() / y.shape[0]


def fvu(y_hat_BE: Tensor, y_BE: Tensor, variance_fn: VarianceFn | None = None) -> Tensor:
    """Fraction of variance unexplained: sum of squared error over total variance about the batch mean."""
    return fvu_from_error((y_hat_BE.float() - y_BE.float()).pow(2).sum(), y_BE, variance_fn)


def fvu_from_error(err_sq: Tensor, y_BE: Tensor, variance_fn: VarianceFn | None = None) -> Tensor:
    """:func:`fvu` from an already summed squared error ``sum ||y_hat - y||^2``."""
    var = (variance_fn or token_variance)(y_BE)
    return err_sq / (y_BE.shape[0] * var).clamp_min(torch.finfo(torch.float32).tiny)


def fired_counts(codes: Codes, num_latents: int) -> Tensor:
    """[L] number of tokens on which each latent was non-zero."""
    if isinstance(codes, SparseCodes):
        active = (codes.vals > 0).reshape(-1).float()
        out = torch.zeros(num_latents, device=active.device)
        return out.index_add_(0, codes.idx.reshape(-1).long(), active)
    return (codes > 0).sum(0).float()


def l0_per_token(codes: Codes) -> Tensor:
    """[B] number of non-zero latents per token."""
    vals = codes.vals if isinstance(codes, SparseCodes) else codes
    return (vals > 0).sum(-1).float()


def geometric_median(points_ND: Tensor, max_iter: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm for the point minimising the sum of Euclidean distances."""
    points = points_ND.float()
    guess = points.mean(0)
    for _ in range(max_iter):
        prev = guess
        weights = 1.0 / (points - guess).norm(dim=1).clamp_min(1e-8)
        guess = (weights[:, None] * points).sum(0) / weights.sum()
        if (guess - prev).norm() <= tol * prev.norm().clamp_min(1e-8):
            break
    return guess


@dataclasses.dataclass(frozen=True)
class Shard:
    """The slice of a latent-parallel model one rank holds: latents [offset, offset + L / world_size)
    of every group (see :meth:`SparseCoder.latent_shard`)."""

    rank: int
    world_size: int
    offset: int
    full_num_latents: int


class LocalLatents:
    """Where a model's latents live: here, all of them (one process).

    A latent-parallel strategy hands a family's :meth:`SparseCoder.forward_with` another
    implementation (:class:`sae.train.sharded_latents.ShardedLatents`: each rank holds a slice of
    every group of latents): ``topk`` then returns the exact global selection with the slots other
    ranks own marked, ``reduce`` sums partial reconstructions over ranks, ``copy_in`` marks an input
    every rank reads (its gradient is summed), ``count`` sums counts. The families write their
    latent-parallel forward once against this interface; they never talk to other ranks.
    """

    #: Whether every latent lives in this process.
    local = True

    def topk(self, scores_BL: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(values [B, k] fp32, local indices [B, k], own mask [B, k] or None when every slot is here)."""
        vals, idx = topk(scores_BL, min(k, scores_BL.shape[1]))
        return vals.float(), idx, None

    def reduce(self, t: Tensor) -> Tensor:
        return t

    def copy_in(self, t: Tensor) -> Tensor:
        return t

    def count(self, n: int) -> int:
        return n


class SparseCoder(nn.Module):
    """Parameters and shared behaviour of every family.

    Parameters: ``W_enc`` [L, D] (rows are encoder directions), ``b_enc`` [L], ``W_dec`` [L, E],
    ``b_dec`` [E], and ``W_skip`` [E, D] for skip transcoders.
    """

    #: Whether decoder rows are kept at unit norm by default for this family.
    unit_norm_decoder: bool = True
    #: Whether the family's codes are SparseCodes.
    sparse_codes: bool = True
    #: Whether a transcoder of this family trains on normalised input and target by default
    #: (``data.normalize=auto``); see :func:`sae.runners.train.resolve_normalize`.
    normalize_transcoder_data: bool = True
    #: Whether the family's loss has a sparsity penalty (L1 or L0) whose coefficient sets its L0.
    sparsity_penalty: bool = False
    #: Whether ``train.parallel=latent`` can split this family's latents over ranks.
    latent_parallel: bool = False
    #: Whether the model spans several layers side by side (d = layers x d_model; a cross-layer
    #: transcoder): it trains on every layer's rows at once, is scored layer by layer and exports as
    #: one cross-layer coder, not as a per-layer SAE.
    cross_layer: bool = False
    #: The plain family this one is at inference (codes and parameters), which the export formats
    #: map to theirs; set by :func:`sae.models.registry.register` (the architecture's own name
    #: unless the class body names another).
    export_form: str = ""

    def __init__(self, cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        num_latents = cfg.num_latents if cfg.num_latents > 0 else cfg.expansion_factor * d_in
        if d_in <= 0 or d_out <= 0 or num_latents <= 0:
            raise ValueError(f"d_in={d_in}, d_out={d_out} and num_latents={num_latents} must be positive")
        if d_out != d_in and not cfg.transcode:
            raise ValueError(f"d_out={d_out} differs from d_in={d_in}; set sae.transcode=true for a transcoder")
        if cfg.skip_connection and not cfg.transcode:
            raise ValueError("sae.skip_connection=true needs sae.transcode=true (a skip transcoder)")
        self.cfg = cfg
        self.d_in, self.d_out, self.num_latents = d_in, d_out, num_latents
        # Unit-norm decoder rows by default for SAEs only. A transcoder's decoder starts at zero and
        # stays free (as sparsify's): its target lives in another space and often at another scale
        # than its input, so random unit rows start it far from the target (output norms 19x the
        # target's on a toy MLP) and the norm constraint slows the decoder's growth to the target.
        auto = cfg.normalize_decoder is None
        self.normalize_decoder = self.unit_norm_decoder and (not cfg.transcode if auto else cfg.normalize_decoder)
        self.zero_decoder_init = cfg.transcode and self.unit_norm_decoder and auto
        # The pre-encoder bias (x - b_dec) only makes sense when input and target are the same space.
        self.apply_b_dec_to_input = not cfg.transcode

        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        W_dec = torch.randn(num_latents, d_out, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        if not self.unit_norm_decoder:
            W_dec *= 0.1  # Anthropic April 2024 update: decoder rows start at norm 0.1.
        # Encoder initialised as the decoder transpose (Gao et al. 2024, sec. A.1).
        W_enc = W_dec.clone() if d_in == d_out else torch.randn(num_latents, d_in, generator=gen) / d_in**0.5
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(num_latents))
        self.W_dec = nn.Parameter(torch.zeros_like(W_dec) if self.zero_decoder_init else W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d_in)) if cfg.skip_connection else None

    # --- contract -------------------------------------------------------------------------
    def encode(self, x_BD: Tensor) -> Codes:
        """Codes for ``x`` in inference mode (no auxiliary losses)."""
        raise NotImplementedError

    def decode(self, codes: Codes) -> Tensor:
        """Reconstruction of the target from codes, without the skip path."""
        raise NotImplementedError

    def forward(self, x_BD: Tensor, y_BE: Tensor | None = None, *, dead_mask: Tensor | None = None,
                sparsity_scale: float = 1.0, variance_fn: VarianceFn | None = None) -> ForwardOutput:
        """Reconstruct ``y`` (``x`` for an SAE) and compute the training losses.

        Args:
            dead_mask: [L] bool, latents considered dead (AuxK).
            sparsity_scale: factor of the sparsity penalty's coefficient (ReLU, JumpReLU, Gated): its
                warm-up, or the target-L0 controller's multiplier (sae.train.sparsity).
            variance_fn: how the target variance (FVU denominator) is computed; default per batch.
        """
        raise NotImplementedError

    def dead_window_fraction(self) -> float | None:
        """``train.dead_tokens_threshold=null``: the fraction of the run's tokens after which a silent
        latent counts as dead, or None for the fixed 10M (sae.train.dead.resolve_dead_threshold)."""
        return None

    # --- latent parallelism: how the family's latents split over ranks ---------------------------
    def latent_axes(self) -> dict[str, int | None]:
        """Parameter name -> the axis latent-parallel ranks split it along (None: replicated)."""
        return {n: 0 if n in ("W_enc", "b_enc", "W_dec") else None for n, _ in self.named_parameters()}

    @property
    def latent_groups(self) -> int:
        """How many groups of latents ranks split alike (each rank holds a slice of every group):
        1 by default; a cross-layer transcoder has one per layer."""
        return 1

    def _split_latents(self, rank: int, world_size: int, width: int) -> tuple[slice, int]:
        if width % world_size:
            raise ValueError(f"num_latents={width} is not divisible by the latent-parallel world size {world_size}")
        n = width // world_size
        return slice(rank * n, (rank + 1) * n), n

    def latent_shard(self, rank: int, world_size: int) -> SparseCoder:
        """Latents [rank L/W, (rank + 1) L/W) as a model of width L/W; its ``shard`` says which."""
        sl, n = self._split_latents(rank, world_size, self.num_latents)
        local = type(self)(dataclasses.replace(self.cfg, num_latents=n), self.d_in, self.d_out)
        if hasattr(self, "k_aux"):
            local.k_aux = self.k_aux
        axes = self.latent_axes()
        local.load_state_dict({k: v if axes.get(k) is None else v[sl] for k, v in self.state_dict().items()})
        local.shard = Shard(rank, world_size, sl.start, self.num_latents)
        return local

    def forward_with(self, latents: LocalLatents, x_BD: Tensor, y_BE: Tensor | None = None, *,
                     dead_mask: Tensor | None = None, sparsity_scale: float = 1.0,
                     variance_fn: VarianceFn | None = None) -> ForwardOutput:
        """:meth:`forward` with the latents placed by ``latents`` (:class:`LocalLatents`, or a
        latent-parallel strategy's slice of them). A family with ``latent_parallel`` overrides it;
        the others only run with all their latents here."""
        if not latents.local:
            raise NotImplementedError(f"architecture {self.architecture!r} does not split its latents over ranks")
        return self.forward(x_BD, y_BE, dead_mask=dead_mask, sparsity_scale=sparsity_scale, variance_fn=variance_fn)

    def init_from_data_with(self, latents: LocalLatents, x_sample_ND: Tensor,
                            y_sample_NE: Tensor | None = None) -> None:
        """:meth:`init_from_data` with the latents placed by ``latents`` (see :meth:`forward_with`):
        every rank holds the same sample, so what depends on all latents (an encoder scale fitted to
        the reconstruction) comes out as for one process holding them all."""
        if not latents.local:
            raise NotImplementedError(f"architecture {self.architecture!r} does not split its latents over ranks")
        self.init_from_data(x_sample_ND, y_sample_NE)

    def join_latent_shards(self, parts: list[SparseCoder], full_num_latents: int) -> SparseCoder:
        """The whole model from every rank's :meth:`latent_shard` (``self`` is one of them), in rank order."""
        full = type(self)(dataclasses.replace(self.cfg, num_latents=full_num_latents), self.d_in, self.d_out)
        axes, states = full.latent_axes(), [p.state_dict() for p in parts]
        full.load_state_dict({k: v if axes.get(k) is None else torch.cat([s[k] for s in states], axes[k])
                              for k, v in states[0].items()})
        return full

    # --- what exports and model cards need from the family -----------------------------------
    def jumprelu_thresholds(self) -> Tensor | None:
        """Per-latent thresholds [L] of this model written as a JumpReLU (what SAELens and
        circuit-tracer load), or None when it is not one.

        Raises:
            ValueError: thresholds not estimated yet (naming the fix)."""
        return None

    def sparsity_rule(self) -> str:
        """How this model chooses its active latents, in one line for its model card."""
        return f"{self.architecture} activation"

    @property
    def default_lr_scale(self) -> float:
        """The factor on Gao et al.'s learning-rate rule when ``train.lr`` is null (1 by default)."""
        return 1.0

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Adam's parameter groups (each with its ``lr``): one for every parameter by default."""
        return [{"params": list(self.parameters()), "lr": lr}]

    @property
    def target_l0(self) -> float:
        """The L0 the trainer steers the sparsity penalty to; 0 for a fixed coefficient (and for the
        families without a penalty). ``sae.target_l0=null``: :meth:`default_target_l0`."""
        if not self.sparsity_penalty:
            return 0.0
        return self.default_target_l0() if self.cfg.target_l0 is None else float(self.cfg.target_l0)

    def default_target_l0(self) -> float:
        """``sae.target_l0=null``: ``k`` for transcoders, 0 (a fixed coefficient) for SAEs."""
        return float(self.cfg.k) if self.cfg.transcode else 0.0

    # --- shared helpers -------------------------------------------------------------------
    def check_x(self, x_BD: Tensor) -> None:
        if x_BD.dim() != 2 or x_BD.shape[1] != self.d_in:
            raise ValueError(
                f"input activations have shape {tuple(x_BD.shape)} but the SAE expects [batch, {self.d_in}]"
            )

    def check_input(self, x_BD: Tensor, y_BE: Tensor | None) -> Tensor:
        """Validate shapes; return the target (``x`` itself for an SAE)."""
        self.check_x(x_BD)
        if y_BE is None:
            if self.cfg.transcode:
                raise ValueError("a transcoder needs a target: call forward(x, y)")
            return x_BD
        if y_BE.shape != (x_BD.shape[0], self.d_out):
            raise ValueError(f"target has shape {tuple(y_BE.shape)} but expected [{x_BD.shape[0]}, {self.d_out}]")
        return y_BE

    def encoder_input(self, x_BD: Tensor) -> Tensor:
        return x_BD - self.b_dec if self.apply_b_dec_to_input else x_BD

    def skip(self, x_BD: Tensor) -> Tensor | None:
        return None if self.W_skip is None else x_BD @ self.W_skip.T

    @torch.no_grad()
    def init_from_data(self, x_sample_ND: Tensor, y_sample_NE: Tensor | None = None) -> None:
        """Data-dependent initialisation, an explicit step the trainer calls before training
        (and before any data-parallel wrapping). The base sets ``b_dec`` from the target sample."""
        self.init_b_dec_from_data(x_sample_ND if y_sample_NE is None else y_sample_NE)
        if self.zero_decoder_init:
            # Centre the pre-activations on the sample (sparsify's transcoder init): b_enc = -W_enc mean(x).
            self.b_enc.copy_(-(x_sample_ND.float().mean(0) @ self.W_enc.T))

    @torch.no_grad()
    def init_b_dec_from_data(self, y_sample_NE: Tensor) -> None:
        """Set ``b_dec`` from a data sample of the target (geometric median, mean or zeros)."""
        method = self.cfg.b_dec_init
        if method == "zeros":
            self.b_dec.zero_()
        elif method == "mean":
            self.b_dec.copy_(y_sample_NE.float().mean(0))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(y_sample_NE))
        else:
            raise ValueError(f"sae.b_dec_init={method!r}; use geometric_median, mean or zeros")

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale decoder rows to unit norm (after each optimiser step)."""
        if self.normalize_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Project out the gradient component parallel to each unit-norm decoder row."""
        if not self.normalize_decoder or self.W_dec.grad is None:
            return
        g, W = self.W_dec.grad, self.W_dec
        # In place, without an [L, D] temporary (fresh large buffers are page-faulted on every step).
        g.addcmul_(torch.einsum("ld,ld->l", g, W).unsqueeze(1), W, value=-1)

    def reconstruct(self, x_BD: Tensor, codes: Codes) -> Tensor:
        """Decoder output plus the skip path (skip transcoders)."""
        x_hat = self.decode(codes)
        skip = self.skip(x_BD)
        return x_hat if skip is None else x_hat + skip
