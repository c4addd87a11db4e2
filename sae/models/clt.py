"""Cross-layer transcoder (CLT) and acausal crosscoder (Ameisen et al. 2025, "Circuit Tracing";
Lindsey et al. 2024, "Sparse Crosscoders"), on the SparseCoder contract.

Layout: the N layers' activations side by side, so ``d_in = d_out = N * M`` (M = d_model,
N = ``sae.clt_layers``): ``x`` concatenates every layer's MLP input (``layers.i.mlp_in``), ``y``
every layer's MLP output (``layers.i.mlp``). Each layer i owns a group of L = ``latents_per_layer``
latents (``num_latents`` of the config is per layer; ``expansion_factor`` is relative to M):

    a_i = act_i(W_enc[i] x_i + b_enc[i])                       [B, L]   group i reads layer i
    y_hat_j = sum_{i <= j} a_i W_dec[i][:, j - i] + b_dec[j]    [B, M]   group i writes layers j >= i

``W_enc`` [N, L, M], ``b_enc`` [N, L], ``W_dec`` a ParameterList with ``W_dec[i]`` [L, N - i, M],
``b_dec`` [N, M]. The acausal crosscoder (``sae.clt_acausal=true``) is the same code with another
mask: every group reads the concatenation of all layers and writes all layers, so ``W_enc`` is
[N, L, N * M] and every ``W_dec[i]`` is [L, N, M] (``first_out(i)`` is 0 instead of i; group i
is still "the latents of layer i" in name, for the layout and the sharding).

Activations, per layer group (``sae.clt_activation``):
    topk       the k largest of each token's L pre-activations, per group (k per layer per token)
    batchtopk  the k * B largest of the group over the batch (cap * k candidates per token, as in
               :mod:`.batchtopk`), with a running threshold per layer for inference
    jumprelu   per-latent thresholds with the straight-through estimators of :mod:`.jumprelu`,
               dense codes, plus ``l0_coefficient`` * L0 (summed over layers) in the loss
TopK/BatchTopK select without autograd and decode only the selected latents
(:func:`sae_kernels.gather_encode` / :func:`sae_kernels.sparse_decode`, sparse backwards): no
[B, L] tensor lies on the gradient path. Latents are selected from pre-activations in the
input's precision: fp32, or bf16 under ``train.mixed_precision=bf16`` autocast
(``sae.selection_dtype`` is ignored). Codes on the concatenated layout index latent ``l`` of group i as ``i * L + l``.

Loss: the sum over output layers of each layer's FVU (``fvu/layer{j}``; their sum ``fvu``), plus
``auxk_alpha`` * AuxK (TopK/BatchTopK: the k_aux largest dead latents of each group reconstruct the
residual, scaled by min(1, dead / (N k_aux))), plus the JumpReLU L0 term.

Decoder normalisation: a latent's decoder row spans every layer it writes. By default
(``sae.normalize_decoder=null``) a transcoder CLT of every activation starts its decoder at zero
with centred pre-activations and keeps it free, as a per-layer transcoder does; a crosscoder on one
point keeps unit rows. With unit rows the *concatenated* row ``W_dec[i][l]``
([N - i, M] flattened) is kept at unit norm, so an activation is the norm of the latent's whole contribution (what TopK
ranks and what an L0 penalty should not be able to shrink away), and the gradient component along
that row is projected out (:meth:`remove_parallel_grad_`). The fused GPU optimiser step
(:class:`sae.train.optim.SAEAdam`) handles one ``W_dec`` tensor only, so a CLT always trains with
torch's Adam and the trainer's own projection and renormalisation passes
(:func:`sae.train.schedule.build_optimizer`). As a safety net the model also renormalises at a
training forward whenever the decoder changed since its own last normalisation (tracked by tensor
versions; an optimiser that writes without bumping them defeats it).

Memory: the causal decoder holds sum_i (N - i) L M = N (N + 1) / 2 * M * L parameters, O(N^2 / 2 *
M * L), against N * M * L for the encoder. Gemma-2-2B-like sizes (N = 26, M = 2304, L = 16384 per
layer): 351 * 2304 * 16384 = 13.25e9 decoder parameters, 49.4 GiB in fp32, and 4x that (197 GiB)
with its gradient and two Adam moments; the encoder adds 0.98e9 (3.7 GiB). The acausal crosscoder
has N^2 blocks in both directions: 676 * 2304 * 16384 = 25.5e9 parameters (95.1 GiB fp32) for the
decoder and as many for the encoder. ``train.parallel=latent`` splits every group's latents (and
their decoder rows) over the ranks.

Shape legend: B tokens, N layers, M d_model, L latents per layer, K slots per token, D = N * M.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from sae_kernels import gather_encode, sparse_decode
from torch import Tensor, nn

from .base import (
    Codes,
    ForwardOutput,
    LocalLatents,
    Shard,
    SparseCoder,
    SparseCodes,
    VarianceFn,
    fvu_from_error,
    geometric_median,
)
from .batchtopk import batch_cut
from .config import SAEConfig
from .dense import activation_scale
from .jumprelu import _JumpReLU, _Step, threshold_groups
from .registry import register

ACTIVATIONS = ("topk", "batchtopk", "jumprelu")


@register("clt")
class CrossLayerTranscoder(SparseCoder):
    cross_layer = True

    def __init__(self, cfg: SAEConfig, d_in: int, d_out: int | None = None, *, seed: int | None = None):
        nn.Module.__init__(self)
        n, d_out = cfg.clt_layers, d_in if d_out is None else d_out
        if n < 1:
            raise ValueError(f"sae.clt_layers={n}: architecture clt needs the number of layers (>= 1) whose "
                             "activations sit side by side in d_in")
        if d_in != d_out or d_in % n:
            raise ValueError(f"d_in={d_in}, d_out={d_out}: a CLT over sae.clt_layers={n} layers needs d_in = d_out = "
                             "clt_layers * d_model")
        if cfg.clt_activation not in ACTIVATIONS:
            raise ValueError(f"sae.clt_activation={cfg.clt_activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if cfg.skip_connection:
            raise ValueError("sae.skip_connection=true is not supported by architecture clt; set it to false")
        M = d_in // n
        L = cfg.num_latents if cfg.num_latents > 0 else cfg.expansion_factor * M
        if not 0 < cfg.k < L:
            raise ValueError(f"sae.k={cfg.k} must be in [1, latents per layer={L}) (k is per layer and token)")
        self.cfg = cfg
        self.n_layers, self.d_model, self.latents_per_layer = n, M, L
        self.full_latents_per_layer = L  # of the whole model, also when this module is one latent-parallel shard
        self.d_in, self.d_out, self.num_latents = d_in, d_out, n * L
        self.activation, self.acausal = cfg.clt_activation, cfg.clt_acausal
        self.sparse_codes = self.activation != "jumprelu"
        self.sparsity_penalty = self.activation == "jumprelu"
        self.k = cfg.k
        self.k_aux = cfg.k_aux if cfg.k_aux > 0 else max(1, M // 2)
        # null (auto): unit-norm rows for a crosscoder / multi-layer SAE (y = x); a transcoder's decoder
        # starts at zero and stays free, as a single-layer transcoder's (sae/models/base.py): with
        # random unit rows the toy CLT ended with 94% dead latents (TopK), 92% (JumpReLU).
        auto = cfg.normalize_decoder is None
        free = cfg.transcode
        self.normalize_decoder = not free if auto else cfg.normalize_decoder
        self.zero_decoder_init = free and auto
        self.apply_b_dec_to_input = not cfg.transcode  # y = x: a multi-layer SAE / crosscoder on one point
        self.W_skip = None
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        d_enc = n * M if self.acausal else M
        self.W_enc = nn.Parameter(torch.randn(n, L, d_enc, generator=gen) / d_enc**0.5)
        self.b_enc = nn.Parameter(torch.zeros(n, L))
        self.W_dec = nn.ParameterList()
        for i in range(n):
            W = torch.randn(L, n - self.first_out(i), M, generator=gen)
            W = torch.zeros_like(W) if self.zero_decoder_init else W / W.flatten(1).norm(dim=1)[:, None, None]
            self.W_dec.append(nn.Parameter(W))
        self.b_dec = nn.Parameter(torch.zeros(n, M))
        if not cfg.transcode:  # y = x: each encoder starts as the transpose of its decoder (Gao et al. 2024, A.1)
            with torch.no_grad():
                for i in range(n):
                    self.W_enc[i] = self.W_dec[i].flatten(1) if self.acausal else self.W_dec[i][:, 0]
        if self.activation == "jumprelu":
            if cfg.jumprelu_bandwidth <= 0 or cfg.jumprelu_init_threshold <= 0:
                raise ValueError(f"sae.jumprelu_bandwidth={cfg.jumprelu_bandwidth} and sae.jumprelu_init_threshold="
                                 f"{cfg.jumprelu_init_threshold} must be positive")
            self.log_threshold = nn.Parameter(torch.full((n, L), math.log(cfg.jumprelu_init_threshold)))
            self.register_buffer("act_scale", torch.ones(n))
        if self.activation == "batchtopk":
            if cfg.batch_topk_cap < 1 or not 0.0 <= cfg.threshold_momentum < 1.0:
                raise ValueError(f"sae.batch_topk_cap={cfg.batch_topk_cap} must be >= 1 and sae.threshold_momentum="
                                 f"{cfg.threshold_momentum} in [0, 1)")
            self.num_candidates = min(L, cfg.batch_topk_cap * cfg.k)  # per token and layer
            self.register_buffer("threshold", torch.full((n,), -1.0))  # < 0: not estimated yet
            self.last_cap_hit, self._cap_hits = 0.0, []
        self.mark_normalized()

    # --- layout ----------------------------------------------------------------------------
    def encoder_input(self, x_BD: Tensor) -> Tensor:
        return x_BD - self.b_dec.flatten() if self.apply_b_dec_to_input else x_BD

    def first_out(self, i: int) -> int:
        """The first output layer group i writes (i for the CLT, 0 for the acausal crosscoder)."""
        return 0 if self.acausal else i

    def layer_inputs(self, x_in_BD: Tensor) -> list[Tensor]:
        """What each group's encoder reads: layer i's slice (CLT) or every layer (crosscoder)."""
        if self.acausal:
            return [x_in_BD] * self.n_layers
        M = self.d_model
        return [x_in_BD[:, i * M:(i + 1) * M].contiguous() for i in range(self.n_layers)]

    def dec_rows(self, i: int) -> Tensor:
        """``W_dec[i]`` as rows [L, (N - first_out(i)) M] (a view)."""
        return self.W_dec[i].view(self.W_dec[i].shape[0], -1)

    def dense_decoder(self) -> Tensor:
        """[N L, D] decoder of the concatenated layout, zeros where a group does not write (no grad)."""
        with torch.no_grad():
            L = self.W_dec[0].shape[0]
            out = self.b_dec.new_zeros(self.n_layers * L, self.d_out)
            for i in range(self.n_layers):
                out[i * L:(i + 1) * L, self.first_out(i) * self.d_model:] = self.dec_rows(i)
            return out

    # --- contract --------------------------------------------------------------------------
    def encode(self, x_BD: Tensor) -> Codes:
        self.check_x(x_BD)
        with torch.no_grad():
            return self._encode(self.encoder_input(x_BD), LocalLatents())[0]

    def decode(self, codes: Codes) -> Tensor:
        L = self.W_dec[0].shape[0]
        if isinstance(codes, SparseCodes):
            per_layer = self._split_sparse(codes)
            return self._decode_sparse([i for i, _ in per_layer], [v for _, v in per_layer])
        if codes.shape[1] != self.n_layers * L:
            raise ValueError(f"dense codes have {codes.shape[1]} latents, the CLT has {self.n_layers * L}")
        return self._decode_dense(list(codes.split(L, dim=1)))

    def optimizer_groups(self, lr: float) -> list[dict]:
        if self.activation != "jumprelu":
            return super().optimizer_groups(lr)
        return threshold_groups(self, lr, self.W_enc.shape[-1])  # each group's encoder width

    def default_target_l0(self) -> float:
        """A JumpReLU transcoder CLT's L0 (summed over layers) is steered to ``sae.k`` per layer, as a
        per-layer transcoder's to ``sae.k``; a crosscoder on one point keeps a fixed coefficient."""
        return float(self.k * self.n_layers) if self.cfg.transcode else 0.0

    def forward(self, x_BD: Tensor, y_BE: Tensor | None = None, *, dead_mask: Tensor | None = None,
                sparsity_scale: float = 1.0, variance_fn: VarianceFn | None = None) -> ForwardOutput:
        return self.forward_with(LocalLatents(), x_BD, y_BE, dead_mask=dead_mask, sparsity_scale=sparsity_scale,
                                 variance_fn=variance_fn)

    def forward_with(self, latents: LocalLatents, x_BD: Tensor, y_BE: Tensor | None = None, *,
                     dead_mask: Tensor | None = None, sparsity_scale: float = 1.0,
                     variance_fn: VarianceFn | None = None) -> ForwardOutput:
        """:meth:`forward` with the latents placed by ``latents`` (a strategy's, or all here)."""
        y_BE = self.check_input(x_BD, y_BE)
        if self.training and torch.is_grad_enabled():
            self._renormalize_if_stale()
        x_in = latents.copy_in(self.encoder_input(x_BD))
        losses: dict[str, Tensor] = {}
        xs = self.layer_inputs(x_in)
        sel: dict = {}
        if self.activation == "jumprelu":
            codes, parts, l0 = self._jumprelu(xs, latents)
            y_hat = self._finish(latents.reduce(parts))
        else:
            codes, sel = self._encode(x_in, latents, train=True, dead_mask=dead_mask, xs=xs)
            W, b = self.W_enc.unbind(0), self.b_enc.unbind(0)
            vals = [gather_encode(xs[i], W[i], b[i], idx, pre).relu() for i, (pre, idx) in enumerate(sel["main"])]
            codes = SparseCodes(torch.cat(vals, 1), codes.idx)
            y_hat = self._finish(latents.reduce(self._partial_sparse([idx for _, idx in sel["main"]], vals)))
        total = self._layer_fvus(y_hat, y_BE, variance_fn, losses)
        if self.activation == "jumprelu":
            losses["l0"] = latents.reduce(l0)
            total = total + self.cfg.l0_coefficient * sparsity_scale * losses["l0"]
        elif sel.get("aux"):
            auxk = self._auxk(xs, sel["aux"], sel["n_dead"], (y_BE - y_hat).detach(), latents, variance_fn)
            losses["auxk"] = auxk
            total = total + self.cfg.auxk_alpha * auxk
        if self.activation == "batchtopk":
            losses["cap_hit"] = torch.tensor(self.last_cap_hit)
        losses["loss"] = total
        return ForwardOutput(y_hat, codes, losses)

    # --- per-layer API (circuit-tracer export) ----------------------------------------------
    def encode_layers(self, x_list: list[Tensor], *, sparse: bool = False) -> list[Tensor | SparseCodes]:
        """Dense codes [B, L] of each layer's group from each layer's MLP input [B, M]; with
        ``sparse``, the TopK families' codes as :class:`SparseCodes` per group (local indices), which
        :meth:`decode_layer` decodes without a [B, L] matrix."""
        codes = self.encode(torch.cat(list(x_list), dim=1))
        L = self.latents_per_layer
        if not isinstance(codes, SparseCodes):
            return list(codes.split(L, dim=1))
        if sparse:
            return [SparseCodes(vals, idx) for idx, vals in self._split_sparse(codes)]
        dense = codes.vals.new_zeros(codes.vals.shape[0], self.n_layers * L).scatter_add_(1, codes.idx, codes.vals)
        return list(dense.split(L, dim=1))

    def decode_layers(self, codes_list: list[Tensor]) -> list[Tensor]:
        """Reconstruction [B, M] of each output layer's MLP output from dense per-layer codes [B, L]."""
        return list(self._decode_dense(list(codes_list)).split(self.d_model, dim=1))

    @torch.no_grad()
    def encode_layer(self, i: int, x_i: Tensor, *, sparse: bool = False) -> Tensor | SparseCodes:
        """Dense codes [B, L] of group i from what its encoder reads (layer i's MLP input [B, M]; the
        crosscoder's groups read every layer, [B, D]), without autograd: the per-layer step of a
        replacement model that runs layer by layer. ``sparse``: the TopK families' codes as
        :class:`SparseCodes` (local indices) instead of a [B, L] matrix."""
        if self.apply_b_dec_to_input:
            raise ValueError("encode_layer needs a transcoder (sae.transcode=true); use encode on the full input")
        want = self.n_layers * self.d_model if self.acausal else self.d_model
        if x_i.dim() != 2 or x_i.shape[1] != want:
            raise ValueError(f"group {i} reads [batch, {want}]; got {tuple(x_i.shape)}")
        pre = self.pre_activations(x_i.float(), i)
        if self.activation == "jumprelu":
            return self._jump(pre.relu(), i)
        vals, idx = self._select(pre, i, LocalLatents())
        if sparse:
            return SparseCodes(vals.relu(), idx)
        return torch.zeros_like(pre).scatter_(1, idx, vals.relu())

    @torch.no_grad()
    def decode_layer(self, j: int, codes: list[Tensor | SparseCodes | None]) -> Tensor:
        """Reconstruction [B, M] of output layer j from group codes (dense [B, L] or
        :class:`SparseCodes` per group; None for groups that do not write layer j, e.g. the CLT's
        groups after j). Sparse codes read only their selected decoder rows."""
        first = next(c for c in codes if c is not None)
        rows = first.vals.shape[0] if isinstance(first, SparseCodes) else first.shape[0]
        out = self.b_dec[j].expand(rows, -1).clone()
        for i, c in enumerate(codes):
            if self.first_out(i) <= j:
                if c is None:
                    raise ValueError(f"output layer {j} needs the codes of group {i}")
                W = self.W_dec[i][:, j - self.first_out(i)]  # [L, M] (strided view)
                if isinstance(c, SparseCodes):
                    out += sparse_decode(c.idx, c.vals, W).to(out.dtype)
                else:
                    out += c.to(out.dtype) @ W
        return out

    # --- encoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def pre_activations(self, x_i: Tensor, i: int) -> Tensor:
        """Pre-activations [B, L] of group i from its encoder input (no autograd, fp32)."""
        return torch.addmm(self.b_enc[i], x_i, self.W_enc[i].T).float()

    def _encode(self, x_in: Tensor, latents: LocalLatents, *, train: bool = False, dead_mask: Tensor | None = None,
                xs: list[Tensor] | None = None) -> tuple[Codes, dict]:
        """Codes on the concatenated layout and, per group, the selection (pre values, local idx)."""
        xs, n = xs if xs is not None else self.layer_inputs(x_in), self.n_layers
        if self.activation == "jumprelu":
            return torch.cat([self._jump(self.pre_activations(xs[i], i).relu(), i) for i in range(n)], 1), {}
        L = self.W_dec[0].shape[0]
        dead = dead_mask.view(n, L) if dead_mask is not None and self.cfg.auxk_alpha > 0 and train else None
        n_dead = latents.count(int(dead.sum())) if dead is not None else 0
        sel: dict = {"main": [], "aux": [] if n_dead else None, "n_dead": n_dead}
        self._cap_hits = []
        for i in range(n):
            with torch.no_grad():
                pre = self.pre_activations(xs[i], i)
                sel["main"].append(self._select(pre, i, latents))
                if n_dead:
                    masked = pre.masked_fill_(~dead[i], -math.inf)
                    vals, idx, own = latents.topk(masked, self.k_aux)
                    keep = torch.isfinite(vals) if own is None else torch.isfinite(vals) & own
                    sel["aux"].append((vals.where(keep, 0.0), idx))
        if self._cap_hits:
            self.last_cap_hit = sum(self._cap_hits) / len(self._cap_hits)
        vals = torch.cat([pre.relu() for pre, _ in sel["main"]], 1)
        idx = torch.cat([idx + i * L for i, (_, idx) in enumerate(sel["main"])], 1)
        return SparseCodes(vals, idx), sel

    def _select(self, pre_BL: Tensor, i: int, latents: LocalLatents) -> tuple[Tensor, Tensor]:
        """(pre-activation values, local indices) of group i's selected latents; values of slots not
        kept (BatchTopK) or owned by another rank are 0."""
        if self.activation == "topk":
            vals, idx, own = latents.topk(pre_BL, self.k)
            return (vals if own is None else vals * own), idx
        cand, idx, own = latents.topk(pre_BL, self.num_candidates)
        cand = cand.relu()
        if self.training:
            keep, kept_min = batch_cut(cand, self.k)
            if kept_min is not None:
                self._update_threshold(i, kept_min)
            capped = self.num_candidates < self.full_latents_per_layer  # a token kept all its candidates
            self._cap_hits.append(keep.all(1).float().mean().item() if capped else 0.0)
        else:
            keep = cand > self.threshold[i].clamp_min(0.0)
        keep = keep if own is None else keep & own
        return cand * keep, idx

    @torch.no_grad()
    def _update_threshold(self, i: int, batch_min: Tensor) -> None:
        t = self.threshold[i]
        m = self.cfg.threshold_momentum
        t.copy_(batch_min if t < 0 else m * t + (1 - m) * batch_min)

    @property
    def threshold_values(self) -> Tensor:
        """JumpReLU thresholds [N, L] (exp of ``log_threshold``)."""
        return self.log_threshold.exp()

    def _jump(self, z_BL: Tensor, i: int) -> Tensor:
        """Group i's JumpReLU of non-negative pre-activations, without autograd."""
        return z_BL * (z_BL > self.threshold_values[i])

    def _jumprelu(self, xs: list[Tensor], latents: LocalLatents) -> tuple[Tensor, Tensor, Tensor]:
        """(dense codes [B, N L], partial reconstruction [B, N, M], L0 per token summed over groups)."""
        W, b, theta = self.W_enc.unbind(0), self.b_enc.unbind(0), self.threshold_values.unbind(0)
        fs, l0 = [], 0.0
        scales = self.act_scale.tolist()  # one read of the device per forward, not one per layer
        for i in range(self.n_layers):
            z = torch.addmm(b[i], xs[i], W[i].T).relu()
            eps = self.cfg.jumprelu_bandwidth * scales[i]
            fs.append(_JumpReLU.apply(z, theta[i], eps))
            l0 = l0 + _Step.apply(z, theta[i], eps).sum(-1).mean()
        return torch.cat(fs, 1), self._partial_dense(fs), l0

    # --- decoding ----------------------------------------------------------------------------
    def _split_sparse(self, codes: SparseCodes) -> list[tuple[Tensor, Tensor]]:
        """Per group (local idx, vals) of concatenated-layout codes: slices when the slots come in
        equal blocks per group (what :meth:`encode` makes), else a masked copy per group."""
        n, L = self.n_layers, self.W_dec[0].shape[0]
        K = codes.idx.shape[1] // n
        group = torch.div(codes.idx, L, rounding_mode="floor")
        if codes.idx.shape[1] == n * K and bool((group == torch.arange(n, device=group.device)
                                                 .repeat_interleave(K)).all()):
            return [(codes.idx[:, i * K:(i + 1) * K] - i * L, codes.vals[:, i * K:(i + 1) * K]) for i in range(n)]
        return [((codes.idx - i * L).where(group == i, 0), codes.vals.where(group == i, 0.0)) for i in range(n)]

    def _partial_sparse(self, idx: list[Tensor], vals: list[Tensor]) -> Tensor:
        """sum_i of group i's decoded codes into the layers it writes: [B, N, M], no b_dec."""
        B, M = vals[0].shape[0], self.d_model
        dtype = torch.promote_types(torch.promote_types(vals[0].dtype, self.W_dec[0].dtype), torch.float32)
        out = torch.zeros(B, self.n_layers, M, device=vals[0].device, dtype=dtype)
        for i in range(self.n_layers):
            out[:, self.first_out(i):] += sparse_decode(idx[i], vals[i], self.dec_rows(i)).view(B, -1, M)
        return out

    def _partial_dense(self, codes: list[Tensor]) -> Tensor:
        B, M = codes[0].shape[0], self.d_model
        dtype = torch.promote_types(torch.promote_types(codes[0].dtype, self.W_dec[0].dtype), torch.float32)
        out = torch.zeros(B, self.n_layers, M, device=codes[0].device, dtype=dtype)
        for i in range(self.n_layers):
            out[:, self.first_out(i):] += (codes[i].to(dtype) @ self.dec_rows(i).to(dtype)).view(B, -1, M)
        return out

    def _finish(self, partial_BNM: Tensor) -> Tensor:
        return (partial_BNM + self.b_dec).flatten(1)

    def _decode_sparse(self, idx: list[Tensor], vals: list[Tensor]) -> Tensor:
        return self._finish(self._partial_sparse(idx, vals))

    def _decode_dense(self, codes: list[Tensor]) -> Tensor:
        if len(codes) != self.n_layers:
            raise ValueError(f"codes for {len(codes)} layers; the CLT has {self.n_layers}")
        return self._finish(self._partial_dense(codes))

    # --- losses ------------------------------------------------------------------------------
    def _layer_fvus(self, y_hat: Tensor, y: Tensor, variance_fn: VarianceFn | None,
                    losses: dict[str, Tensor]) -> Tensor:
        """Adds ``fvu/layer{j}`` and ``fvu`` (their sum) to ``losses``; returns the sum."""
        B, M = y.shape[0], self.d_model
        err = (y_hat.float() - y.float()).pow(2).view(B, self.n_layers, M).sum((0, 2))
        total = 0.0
        for j in range(self.n_layers):
            losses[f"fvu/layer{j}"] = fvu_from_error(err[j], y[:, j * M:(j + 1) * M], variance_fn)
            total = total + losses[f"fvu/layer{j}"]
        losses["fvu"] = total
        return total

    def _auxk(self, xs: list[Tensor], aux: list[tuple[Tensor, Tensor]], n_dead: int, residual: Tensor,
              latents: LocalLatents, variance_fn: VarianceFn | None) -> Tensor:
        """AuxK: the dead latents' reconstruction of the residual, FVU summed over layers."""
        W, b = self.W_enc.unbind(0), self.b_enc.unbind(0)
        vals = [gather_encode(xs[i], W[i], b[i], idx, pre).relu() for i, (pre, idx) in enumerate(aux)]
        e_hat = latents.reduce(self._partial_sparse([idx for _, idx in aux], vals)).flatten(1)
        err = (e_hat - residual.float()).pow(2).view(residual.shape[0], self.n_layers, -1).sum((0, 2))
        M = self.d_model
        rec = sum(fvu_from_error(err[j], residual[:, j * M:(j + 1) * M], variance_fn) for j in range(self.n_layers))
        return min(n_dead / (self.n_layers * self.k_aux), 1.0) * rec

    # --- decoder norm ------------------------------------------------------------------------
    def mark_normalized(self) -> None:
        """Record the decoder as normalised as it stands (after a change made on purpose: a load, a
        slice, a fold), so a training forward does not renormalise it."""
        self.__dict__["_dec_versions"] = [p._version for p in self.W_dec]

    @torch.no_grad()
    def _renormalize_if_stale(self) -> None:
        """Renormalise decoder rows that changed since the last normalisation and left unit norm
        (by more than 1e-5: rows loaded from a checkpoint stay bitwise as saved)."""
        if not self.normalize_decoder or self.__dict__["_dec_versions"] == [p._version for p in self.W_dec]:
            return
        if any(float((self.dec_rows(i).norm(dim=1) - 1).abs().max()) > 1e-5 for i in range(self.n_layers)):
            self.normalize_decoder_()
        self.mark_normalized()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each latent's concatenated decoder row (every layer it writes) to unit norm."""
        if self.normalize_decoder:
            for i in range(self.n_layers):
                rows = self.dec_rows(i)
                rows /= rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).eps)
        self.mark_normalized()

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Project out the gradient component along each latent's concatenated decoder row."""
        if not self.normalize_decoder:
            return
        for i, p in enumerate(self.W_dec):
            if p.grad is not None:
                g, W = p.grad.view(p.shape[0], -1), self.dec_rows(i)
                g.addcmul_(torch.einsum("ld,ld->l", g, W).unsqueeze(1), W, value=-1)

    def sparsity_rule(self) -> str:
        return f"{self.activation} activation; {self.n_layers} layers of {self.latents_per_layer} latents"

    def jumprelu_thresholds(self) -> Tensor | None:
        """[N, L]: each group's JumpReLU thresholds, or its BatchTopK inference threshold for every
        latent of the group; None for TopK."""
        if self.activation == "jumprelu":
            return self.threshold_values.detach()
        if self.activation != "batchtopk":
            return None
        if bool((self.threshold < 0).any()):
            raise ValueError("this BatchTopK CLT has no inference threshold yet for some layers (estimated during "
                             "training); train it for at least one step before exporting")
        return self.threshold.detach()[:, None].expand(self.n_layers, self.latents_per_layer)

    # --- latent parallelism (sae.train.sharded_latents places them) ------------------
    latent_parallel = True

    def latent_axes(self) -> dict[str, int | None]:
        """Every layer's group sliced alike: W_enc, b_enc, log_threshold along dim 1, W_dec.i along its rows."""
        along_1 = ("W_enc", "b_enc", "log_threshold")
        return {n: 1 if n in along_1 else 0 if n.startswith("W_dec.") else None for n, _ in self.named_parameters()}

    @property
    def latent_groups(self) -> int:
        return self.n_layers

    def latent_shard(self, rank: int, world_size: int) -> CrossLayerTranscoder:
        """Latents [rank L/W, (rank + 1) L/W) of every group as a CLT of width L/W per layer."""
        L = self.latents_per_layer
        if L % world_size:
            raise ValueError(f"a CLT's latents per layer ({L}: sae.num_latents, or sae.expansion_factor x d_model) "
                             f"must divide evenly over the {world_size} latent-parallel ranks; choose a multiple of "
                             f"{world_size}")
        sl, Lr = self._split_latents(rank, world_size, L)
        # The slice may hold fewer latents than k (the global selection takes k over all ranks): build it
        # with a k it accepts, then give it the model's own.
        local = CrossLayerTranscoder(dataclasses.replace(self.cfg, num_latents=Lr, k=max(1, min(self.k, Lr - 1))),
                                     self.d_in, self.d_out)
        local.cfg, local.k = dataclasses.replace(self.cfg, num_latents=Lr), self.k
        local.full_latents_per_layer, local.k_aux = L, self.k_aux
        if hasattr(self, "num_candidates"):
            local.num_candidates = self.num_candidates
        axes = self.latent_axes()
        local.load_state_dict({k: v if axes.get(k) is None else v.narrow(axes[k], sl.start, Lr)
                               for k, v in self.state_dict().items()})
        local.mark_normalized()  # decoder rows are whole on each rank: unit norm as in ``self``
        local.shard = Shard(rank, world_size, sl.start, self.num_latents)
        return local

    def join_latent_shards(self, parts: list[SparseCoder], full_num_latents: int) -> CrossLayerTranscoder:
        full = super().join_latent_shards(parts, full_num_latents // self.n_layers)  # the config counts per layer
        full.mark_normalized()
        return full

    # --- normalisation ----------------------------------------------------------------------
    @torch.no_grad()
    def fold_normalization_(self, x_maps: list[tuple[float, Tensor]], y_maps: list[tuple[float, Tensor]]) -> None:
        """Fold per-layer normalisers into the weights, in place, so the CLT reads and writes raw rows.

        Layer j's rows were trained as x'_j = (x_j - mu_x_j) s_x_j and y'_j = (y_j - mu_y_j) s_y_j
        (``x_maps[j]`` = (s_x_j, mu_x_j [M]), likewise ``y_maps``): every encoder block reading layer
        j is scaled by s_x_j and its bias shifted by -s_x_j W mu_x_j, every decoder block writing
        layer j divided by s_y_j, and b_dec_j <- b_dec_j / s_y_j + mu_y_j. Pre-activations are
        unchanged, so selections and thresholds carry over. Arithmetic in float64.

        Raises:
            ValueError: a map per layer missing, or a coder with a pre-encoder bias (transcode=false).
        """
        n, M = self.n_layers, self.d_model
        if len(x_maps) != n or len(y_maps) != n:
            raise ValueError(f"normalisation for {len(x_maps)} input and {len(y_maps)} target layers, but the CLT has "
                             f"{n} layers; the cfg.json's normalization.per_layer is damaged")
        if self.apply_b_dec_to_input:
            raise ValueError("a multi-layer coder of its own input (sae.transcode=false) cannot fold per-layer "
                             "normalisation into one pre-encoder bias; train it with data.normalize=none")
        s_x = torch.tensor([float(s) for s, _ in x_maps], dtype=torch.float64)
        mu_x = torch.cat([mu.double().cpu() for _, mu in x_maps])
        for i in range(n):
            W = self.W_enc[i].double()
            cols = torch.arange(W.shape[1]) // M + (0 if self.acausal else i)  # the layer each column reads
            W_raw = W * s_x[cols].to(W.device)[None, :]
            mu = mu_x[i * M:(i + 1) * M] if not self.acausal else mu_x
            self.b_enc[i].copy_(self.b_enc[i].double() - W_raw @ mu.to(W.device))
            self.W_enc[i].copy_(W_raw)
            for j in range(self.first_out(i), n):
                s, _ = y_maps[j]
                self.W_dec[i][:, j - self.first_out(i)].copy_(self.W_dec[i][:, j - self.first_out(i)].double() / s)
        for j, (s, mu) in enumerate(y_maps):
            self.b_dec[j].copy_(self.b_dec[j].double() / s + mu.double().to(self.b_dec.device))
        self.mark_normalized()

    # --- data-dependent init -----------------------------------------------------------------
    def init_from_data(self, x_sample_ND: Tensor, y_sample_NE: Tensor | None = None) -> None:
        self.init_from_data_with(LocalLatents(), x_sample_ND, y_sample_NE)

    @torch.no_grad()
    def init_from_data_with(self, latents: LocalLatents, x_sample_ND: Tensor,
                            y_sample_NE: Tensor | None = None) -> None:
        """b_dec per layer from the target sample; JumpReLU thresholds at each latent's (1 - k/L)
        quantile; then each group's encoder scaled by the least-squares factors that best fit the
        initial reconstruction to the sample (TopK family: when ``sae.fit_encoder_scale``).
        ``latents``: where the latents live (a latent-parallel strategy's, or all here)."""
        y = (x_sample_ND if y_sample_NE is None else y_sample_NE).float()
        n, M = self.n_layers, self.d_model
        for j in range(n):
            self.b_dec[j].copy_(self._b_dec_init(y[:, j * M:(j + 1) * M]))
        xs = self.layer_inputs(self.encoder_input(x_sample_ND.float()))
        if self.zero_decoder_init:  # centred pre-activations (sparsify's transcoder init)
            for i in range(n):
                self.b_enc[i].copy_(-(xs[i].mean(0) @ self.W_enc[i].T))
        if self.activation == "jumprelu":
            self._init_thresholds(y, xs)
        if self.zero_decoder_init or (self.activation != "jumprelu" and not self.cfg.fit_encoder_scale):
            self.mark_normalized()  # a zero decoder: no reconstruction to fit the encoder's scale to
            return
        codes = []
        for i in range(n):
            if self.activation == "jumprelu":  # kept sparse: (values, indices) of each token's active latents
                f = self._jump(self.pre_activations(xs[i], i).relu(), i)
                v, idx = f.topk(max(1, int((f > 0).sum(1).max())), dim=1, sorted=False)
                codes.append(SparseCodes(v, idx))
            else:  # per-token top-k, also for BatchTopK (as topk.py)
                v, idx, own = latents.topk(self.pre_activations(xs[i], i), self.k)
                codes.append(SparseCodes(v.relu() if own is None else v.relu() * own, idx))
        scale = self._encoder_scales(codes, y - self.b_dec.flatten(), latents)
        self.W_enc.mul_(scale[:, None, None])
        self.b_enc.mul_(scale[:, None])
        if self.activation == "jumprelu":
            self.log_threshold.add_(scale.log()[:, None])
        self.mark_normalized()

    def _init_thresholds(self, y_ND: Tensor, xs: list[Tensor]) -> None:
        """JumpReLU: each layer's bandwidth unit from its target, thresholds at the (1 - k/L) quantile."""
        M, L = self.d_model, self.full_latents_per_layer
        for j in range(self.n_layers):
            self.act_scale[j] = activation_scale(y_ND[:, j * M:(j + 1) * M])
        for i in range(self.n_layers):
            z = self.pre_activations(xs[i], i).relu()
            q = torch.quantile(z, 1.0 - self.k / L, dim=0) if z.shape[0] > 1 else z[0]
            floor = self.cfg.jumprelu_init_threshold * float(self.act_scale[i])
            self.log_threshold[i].copy_(q.clamp_min(floor).log())

    def _b_dec_init(self, y_NM: Tensor) -> Tensor:
        method = self.cfg.b_dec_init
        if method == "zeros":
            return torch.zeros_like(y_NM[0])
        if method == "mean":
            return y_NM.mean(0)
        if method == "geometric_median":
            return geometric_median(y_NM)
        raise ValueError(f"sae.b_dec_init={method!r}; use geometric_median, mean or zeros")

    def _encoder_scales(self, codes: list[SparseCodes], target_ND: Tensor, latents: LocalLatents,
                        sweeps: int = 200) -> Tensor:
        """Factors s [N] > 0 minimising ||sum_i s_i decode_i(codes_i) - target||^2: the normal
        equations accumulated one output layer at a time (memory O(N B M)), solved by coordinate
        descent from s = 1 with each s_i kept above 0.1 of its own natural scale (a positive factor
        keeps every selection; a group whose output only hurts starts near silent, not dead)."""
        n, M = self.n_layers, self.d_model
        G, r = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for j in range(n):
            writers = [i for i in range(n) if self.first_out(i) <= j]
            C = latents.reduce(torch.stack([sparse_decode(codes[i].idx, codes[i].vals, self.W_dec[i][
                :, j - self.first_out(i)].contiguous()) for i in writers])).double()
            w = torch.tensor(writers)
            # The small normal equations live on the host (the solve below reads them element-wise).
            G[w[:, None], w[None, :]] += torch.einsum("anm,bnm->ab", C, C).cpu()
            r[w] += torch.einsum("anm,nm->a", C, target_ND[:, j * M:(j + 1) * M].double()).cpu()
        diag = G.diag()
        if not bool(torch.isfinite(G).all() and torch.isfinite(r).all()):
            return torch.ones(n, device=target_ND.device)
        floor = 0.1 * (float(target_ND.double().pow(2).sum()) / diag.clamp_min(1e-30)).sqrt()
        s = torch.ones(n, dtype=torch.float64)
        for _ in range(sweeps):
            for a in range(n):
                if diag[a] > 0:
                    s[a] = max(float(floor[a]), float((r[a] - G[a] @ s + diag[a] * s[a]) / diag[a]))
        return s.float().to(target_ND.device)
