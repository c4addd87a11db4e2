"""SAE architectures: one file per family, chosen by name through :mod:`.registry`."""

from .base import (
    Codes,
    ForwardOutput,
    SparseCoder,
    SparseCodes,
    VarianceFn,
    fired_counts,
    fvu,
    fvu_from_error,
    l0_per_token,
    token_variance,
)
from .config import SAEConfig
from .registry import architectures, build_sae, sae_class

# Every family, so the registry is complete before anything is built (registration side effect).
from . import batchtopk, clt, gated, jumprelu, matryoshka, relu, topk  # noqa: E402, F401, I001  isort: skip

__all__ = [
    "Codes", "ForwardOutput", "SparseCodes", "SparseCoder", "SAEConfig", "architectures", "build_sae",
    "fired_counts", "fvu", "fvu_from_error", "l0_per_token", "sae_class", "token_variance", "VarianceFn",
]
