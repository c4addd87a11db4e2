"""Sparse ops for TopK-family sparse autoencoders.

The package ``sae_kernels`` in the top-level folder ``kernels/`` (the PyPI name ``kernels`` belongs to
Hugging Face; ``kernels/`` itself is not a package, so the repo root on ``sys.path`` hides nothing).

Public ops (autograd-aware, backend chosen by :mod:`dispatch`):

- :func:`sparse_decode` ``x_hat_BD = sum_k vals_BK * W_dec_LD[idx_BK]``
- :func:`gather_encode` gradient-carrying gather of pre-activations at the top-k indices, whose
  backward is the sparse-transpose product ``grad_W_enc_LD = S_LB^T x_BD``.
- :func:`gather_pre_activations` exact pre-activations at given indices (no autograd).
- :func:`threshold_select` / :func:`jumprelu_slots` (:mod:`.jumprelu`): the entries above
  per-latent thresholds as bags of slots, and JumpReLU with its straight-through estimators on them.

Shape legend: B tokens, D d_in, L latents, K k.
"""

from .dispatch import Backend, resolve_backend
from .jumprelu import jumprelu_slots, threshold_select
from .sparse_decode import sparse_decode
from .sparse_encode import gather_encode, gather_pre_activations

__all__ = ["Backend", "resolve_backend", "sparse_decode", "gather_encode", "gather_pre_activations", "jumprelu_slots",
           "threshold_select"]
