"""Small SAEs of every architecture with non-trivial weights, and output comparisons, for export tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sae.models import SAEConfig, SparseCoder, SparseCodes, build_sae

D, L, K = 12, 48, 4

# (id, architecture, transcode, skip, d_out)
CASES = [
    ("topk", "topk", False, False, D),
    ("batchtopk", "batchtopk", False, False, D),
    ("relu", "relu", False, False, D),
    ("jumprelu", "jumprelu", False, False, D),
    ("topk_transcoder", "topk", True, False, D),
    ("topk_skip_transcoder", "topk", True, True, D),
    ("relu_transcoder", "relu", True, False, 10),
    ("relu_skip_transcoder", "relu", True, True, 10),
    ("jumprelu_transcoder", "jumprelu", True, False, 10),
    ("jumprelu_skip_transcoder", "jumprelu", True, True, 10),
    ("batchtopk_transcoder", "batchtopk", True, False, 10),
    ("gated", "gated", False, False, D),
    ("gated_transcoder", "gated", True, False, 10),
    ("matryoshka_topk", "matryoshka_topk", False, False, D),
    ("matryoshka_batchtopk", "matryoshka_batchtopk", False, False, D),
]
BATCHTOPK_FAMILY = ("batchtopk", "matryoshka_batchtopk")


def make_sae(arch: str, transcode: bool = False, skip: bool = False, d_out: int = D, seed: int = 0) -> SparseCoder:
    """An SAE whose every parameter is perturbed away from its init (biases and thresholds non-zero)."""
    # cap * k >= L: BatchTopK's inference keeps every latent above its threshold, as a JumpReLU does.
    cfg = SAEConfig(architecture=arch, num_latents=L, k=K, transcode=transcode, skip_connection=skip,
                    batch_topk_cap=math.ceil(L / K))
    sae = build_sae(cfg, D, d_out, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name != "log_threshold":
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        sae.normalize_decoder_()
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty(L).uniform_(0.05, 0.6, generator=gen).log())
            sae.act_scale.fill_(1.7)
        if arch in BATCHTOPK_FAMILY:
            sae.threshold.fill_(0.3)
    return sae.eval()


def activations(n: int = 64, d: int = D, seed: int = 5) -> Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def dense(codes, num_latents: int) -> Tensor:
    """[B, L] codes whatever the family's representation."""
    if isinstance(codes, SparseCodes):
        out = torch.zeros(codes.vals.shape[0], num_latents)
        return out.scatter_add_(1, codes.idx.long(), codes.vals.float())
    return codes


@torch.no_grad()
def outputs(sae: SparseCoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """(dense codes, reconstruction incl. skip path) on ``x``."""
    codes = sae.encode(x)
    return dense(codes, sae.num_latents), sae.reconstruct(x, codes)


def effective_threshold(sae: SparseCoder) -> Tensor | None:
    """[L] inference threshold of the JumpReLU / BatchTopK families (None for the others)."""
    if sae.architecture == "jumprelu":
        return sae.threshold.detach()
    if sae.architecture in BATCHTOPK_FAMILY:
        return torch.full((sae.num_latents,), float(sae.threshold))
    return None
