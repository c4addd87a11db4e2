"""Dead-latent tracking: tokens since each latent last fired (Gao et al. 2024, sec. A.2)."""

from __future__ import annotations

import torch
from torch import Tensor

#: Gao et al.'s window (and sparsify's default): a latent is dead after 10M tokens without firing.
MAX_DEAD_TOKENS = 10_000_000


def resolve_dead_threshold(configured: int | None, run_tokens: int, run_fraction: float | None = None) -> int:
    """``train.dead_tokens_threshold``; null: :data:`MAX_DEAD_TOKENS`, or for a family that asks for
    a window relative to the run (``SparseCoder.dead_window_fraction``) that fraction of the run's
    tokens, at most :data:`MAX_DEAD_TOKENS`.

    Ghost grads (ReLU and Gated transcoders) need the relative window: a 10M-token one never closes
    in a run of a few million tokens, and a 300-step ReLU transcoder on SmolLM2 kept 63% of its
    latents silent. AuxK (the TopK family) keeps Gao et al.'s 10M: at 2% of that run it made
    BatchTopK and Matryoshka steps 45-75% slower and left as many latents dead.
    """
    if configured is not None:
        return configured
    if run_fraction is None:
        return MAX_DEAD_TOKENS
    return max(1, min(MAX_DEAD_TOKENS, int(run_tokens * run_fraction)))


class DeadLatentTracker:
    """Counts tokens since each latent fired; a latent is dead after ``threshold_tokens``."""

    def __init__(self, num_latents: int, threshold_tokens: int, device: torch.device | str = "cpu"):
        if threshold_tokens <= 0:
            raise ValueError(f"dead_tokens_threshold={threshold_tokens} must be positive")
        self.threshold_tokens = threshold_tokens
        self.tokens_since_fired = torch.zeros(num_latents, dtype=torch.int64, device=device)
        # Host-side upper bound of max(tokens_since_fired): while it is below the threshold no
        # latent can be dead, and nothing needs to read the device (a sync) to know it.
        self._bound = 0

    def update(self, fired_counts_L: Tensor, num_tokens: int) -> None:
        """Advance by one batch of ``num_tokens`` tokens given per-latent firing counts (no host sync)."""
        self.update_device(fired_counts_L, num_tokens)
        self.advance_host(num_tokens)

    def update_device(self, fired_counts_L: Tensor, num_tokens: int) -> None:
        """The device half of :meth:`update` (what a captured CUDA graph replays)."""
        self.tokens_since_fired += num_tokens
        self.tokens_since_fired.masked_fill_(fired_counts_L > 0, 0)

    def advance_host(self, num_tokens: int) -> None:
        """The host half of :meth:`update`: the bound on tokens since any latent fired."""
        self._bound += num_tokens

    def refresh_bound(self) -> None:
        """Tighten the host-side bound to the exact maximum (a host sync: call at log steps)."""
        self._bound = int(self.tokens_since_fired.max()) if self.tokens_since_fired.numel() else 0

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.threshold_tokens

    def dead_mask_if_any(self) -> Tensor | None:
        """:attr:`dead_mask`, or None when the host-side bound rules out any dead latent."""
        return self.dead_mask if self._bound >= self.threshold_tokens else None

    @property
    def dead_fraction(self) -> float:
        return self.dead_mask.float().mean().item()

    def state_dict(self) -> dict[str, Tensor]:
        return {"tokens_since_fired": self.tokens_since_fired.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        t = state["tokens_since_fired"]
        if t.shape != self.tokens_since_fired.shape:
            raise ValueError(f"dead-latent state has {t.shape[0]} latents, SAE has {self.tokens_since_fired.shape[0]}")
        self.tokens_since_fired.copy_(t)
        self.refresh_bound()
