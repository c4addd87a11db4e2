"""Fold the activation normalisation an SAE was trained with into its weights (export stage).

Training may normalise activations (``data.normalize``; cfg.json records it as ``normalization``):
x' = (x - mu_x) * s_x, and a transcoder's target likewise with (mu_y, s_y). SAELens and sparsify
apply an SAE to raw model activations, so their exports carry the map inside the weights: the
folded SAE on raw x gives the same codes and the raw-space reconstruction y_hat = y_hat' / s_y + mu_y.

SAE (encoder input x - b_dec; one normaliser, s and mu):
    W_enc <- s W_enc,   W_dec <- W_dec / s,   b_dec <- b_dec / s + mu;   b_enc and thresholds unchanged,
since W_enc((x - mu) s - b_dec) = s W_enc (x - (mu + b_dec / s)).
Transcoder (no pre-encoder bias):
    W_enc <- s_x W_enc,   b_enc <- b_enc - s_x W_enc mu_x,   W_dec <- W_dec / s_y,
    W_skip <- (s_x / s_y) W_skip,   b_dec <- b_dec / s_y + mu_y - (s_x / s_y) W_skip mu_x.
(A gated transcoder's magnitude bias shifts like b_enc, times exp(r_mag).)
Pre-activations are unchanged, so TopK selections and JumpReLU/BatchTopK thresholds carry over.
A cross-layer transcoder records one normaliser pair per layer (``normalization.per_layer``) and
folds them itself (:meth:`sae.models.clt.CrossLayerTranscoder.fold_normalization_`).
The arithmetic runs in float64; the folded weights differ from exact by float32 rounding only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from sae.buffer.normalize import per_layer_affines, recorded_affine
from sae.models import SparseCoder


def is_identity(normalization: dict[str, Any] | None) -> bool:
    """Whether the recorded normalisation leaves activations unchanged."""
    norm = normalization or {}
    if "per_layer" in norm:
        layers = norm["per_layer"]
        return isinstance(layers, list) and all(isinstance(e, dict) and is_identity(e) for e in layers)
    return all(not e or e.get("mode", "none") == "none" for e in norm.values())


@torch.no_grad()
def fold_normalization(sae: SparseCoder, normalization: dict[str, Any] | None) -> SparseCoder:
    """A copy of ``sae`` that works on raw activations (see the module docstring).

    Args:
        normalization: cfg.json's ``normalization`` ({"x": {...}, "y": {...}}), or None.

    Raises:
        ValueError: an SAE whose recorded input and target normalisers differ, or damaged entries.
    """
    out = copy.deepcopy(sae).cpu()
    if is_identity(normalization):
        return out
    norm = normalization or {}
    if "per_layer" in norm:  # a CLT's, one normaliser pair per layer
        if not hasattr(out, "fold_normalization_"):
            raise ValueError(f"cfg.json records per-layer normalisation for a {sae.architecture!r} SAE, which has one "
                             "layer; the SAE folder is damaged or its cfg.json was edited")
        out.fold_normalization_(*per_layer_affines(norm["per_layer"], out.d_model))
        return out
    x = recorded_affine(norm.get("x"), sae.d_in, "x")
    if sae.apply_b_dec_to_input:
        y = recorded_affine(norm.get("y"), sae.d_out, "y") if norm.get("y") else x
        if (x is None) != (y is None) or (x is not None and (x[0] != y[0] or not torch.equal(x[1], y[1]))):
            raise ValueError("cfg.json records different input and target normalisation for an SAE (not a "
                             "transcoder); it cannot be folded into one pre-encoder bias")
        s, mu = x if x is not None else (1.0, torch.zeros(sae.d_in, dtype=torch.float64))
        W_enc, W_dec, b_dec = (t.double() for t in (out.W_enc, out.W_dec, out.b_dec))
        out.W_enc.copy_(W_enc * s)
        out.W_dec.copy_(W_dec / s)
        out.b_dec.copy_(b_dec / s + mu)
        return out
    y = recorded_affine(norm.get("y"), sae.d_out, "y")
    s_x, mu_x = x if x is not None else (1.0, torch.zeros(sae.d_in, dtype=torch.float64))
    s_y, mu_y = y if y is not None else (1.0, torch.zeros(sae.d_out, dtype=torch.float64))
    W_enc, b_enc, W_dec, b_dec = (t.double() for t in (out.W_enc, out.b_enc, out.W_dec, out.b_dec))
    out.W_enc.copy_(W_enc * s_x)
    out.b_enc.copy_(b_enc - s_x * (W_enc @ mu_x))
    if hasattr(out, "b_mag"):  # Gated: the magnitude path reads exp(r_mag) * W_enc x, shifted alike
        out.b_mag.copy_(out.b_mag.double() - out.r_mag.double().exp() * s_x * (W_enc @ mu_x))
    out.W_dec.copy_(W_dec / s_y)
    new_b_dec = b_dec / s_y + mu_y
    if out.W_skip is not None:
        W_skip = out.W_skip.double()
        new_b_dec -= (s_x / s_y) * (W_skip @ mu_x)
        out.W_skip.copy_(W_skip * (s_x / s_y))
    out.b_dec.copy_(new_b_dec)
    return out
