"""Where training activations come from: synthetic toy data, a harvested buffer, or a live harvest.

``DataConfig`` is the ``data`` group of ``sae-train``; ``WriterConfig`` is the ``writer`` node of
``sae-harvest``. Validation lives in :func:`validate_data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig

from .synthetic import SyntheticConfig

NORMALIZE = ("auto", "none", "scale", "center_scale")
VERIFY = ("lazy", "open", "none")


@dataclass
class WriterConfig:
    """How ``sae-harvest`` stores activations."""

    out_dir: str = "runs/buffer"
    shard_tokens: int = 65536  # rows per shard file (per hook point)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    overwrite: bool = False  # replace a complete buffer at out_dir


@dataclass
class BufferConfig:
    """Reading a harvested buffer."""

    path: str = "runs/buffer"
    # Rows are shuffled within windows of this many shards (shard order is shuffled per epoch).
    mixing_shards: int = 4
    epochs: int = 0  # 0: endless (the trainer's budget decides)
    heldout_shards: int = 1  # the last N shards are never trained on; they feed the final evaluation
    verify: str = "lazy"  # checksums: lazy (each shard on first use) | open (all at start) | none (sizes only)


@dataclass
class LiveConfig:
    """Harvesting while training, without disk."""

    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    harvest: HarvestConfig = field(default_factory=lambda: HarvestConfig(progress=False))
    mixing_tokens: int = 65536  # rows shuffled together (memory: about two such blocks)
    heldout_contexts: int = 64  # the first contexts are held out for evaluation and normalisation stats
    # Contexts after the held-out ones that training skips, e.g. those the run a fine-tune starts
    # from (train.init_from) already trained on, so that the fine-tune reads new text.
    skip_contexts: int = 0


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | buffer | live
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    hookpoint: str = ""  # buffer: "" picks the buffer's only hook point; live: required
    target_hookpoint: str = ""  # transcoders: the hook point to reconstruct (same tokens)
    # Several hook points, one SAE each (with train.parallel=sae, spread across ranks); when set it
    # replaces ``hookpoint``, and excludes ``target_hookpoint``. Globs allowed for data=live.
    hookpoints: list[str] = field(default_factory=list)
    # With ``hookpoints``: one transcoder per pair, the i-th hook point (after glob expansion, in layer
    # order) read, the i-th of these reconstructed; e.g. hookpoints=[layers.*.mlp_in]
    # target_hookpoints=[layers.*.mlp] for a transcoder per MLP from one live pass.
    target_hookpoints: list[str] = field(default_factory=list)
    # auto | none | scale (x * sqrt(d) / E||x||, SAELens) | center_scale ((x - mean) * sqrt(d / E||x - mean||^2)).
    # auto: scale for transcoders but ReLU and Gated ones (input and target each to E||.||^2 = d: a
    # target ~100x smaller than the input otherwise leaves Adam's steps far larger than the decoder's
    # scale), CLTs included (per layer), none for SAEs. The weights are exported with the
    # normalisation folded in either way.
    normalize: str = "auto"
    seed: int = 0
    prefetch_batches: int = 4  # batches prepared ahead by a background thread (0: none)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    live: LiveConfig = field(default_factory=LiveConfig)


def validate_data(cfg: DataConfig) -> None:
    """Raise ``ValueError`` naming the first bad field, its value, and the fix."""
    checks = [
        (cfg.source in ("synthetic", "buffer", "live"), "source", cfg.source, "must be synthetic, buffer or live"),
        (cfg.normalize in NORMALIZE, "normalize", cfg.normalize, f"must be one of {', '.join(NORMALIZE)}"),
        (cfg.prefetch_batches >= 0, "prefetch_batches", cfg.prefetch_batches, "must be >= 0"),
        (cfg.buffer.mixing_shards > 0, "buffer.mixing_shards", cfg.buffer.mixing_shards, "must be > 0"),
        (cfg.buffer.epochs >= 0, "buffer.epochs", cfg.buffer.epochs, "must be >= 0 (0: endless)"),
        (cfg.buffer.heldout_shards >= 0, "buffer.heldout_shards", cfg.buffer.heldout_shards, "must be >= 0"),
        (cfg.buffer.verify in VERIFY, "buffer.verify", cfg.buffer.verify, f"must be one of {', '.join(VERIFY)}"),
        (cfg.live.mixing_tokens > 0, "live.mixing_tokens", cfg.live.mixing_tokens, "must be > 0"),
        (cfg.live.heldout_contexts >= 0, "live.heldout_contexts", cfg.live.heldout_contexts, "must be >= 0"),
        (cfg.live.skip_contexts >= 0, "live.skip_contexts", cfg.live.skip_contexts, "must be >= 0"),
        (cfg.source != "live" or bool(cfg.hookpoint) or bool(cfg.hookpoints), "hookpoint", cfg.hookpoint,
         "must name a hook point for data=live (e.g. data.hookpoint=layers.3)"),
        (not cfg.hookpoints or not cfg.target_hookpoint, "hookpoints", cfg.hookpoints,
         "excludes data.target_hookpoint (one SAE per listed hook point; for a transcoder per hook point list "
         "the targets in data.target_hookpoints)"),
        (not cfg.hookpoints or cfg.source != "synthetic", "hookpoints", cfg.hookpoints,
         "needs data=buffer or data=live"),
        (not cfg.target_hookpoints or bool(cfg.hookpoints), "target_hookpoints", cfg.target_hookpoints,
         "pairs with data.hookpoints (the inputs, one per target); for one transcoder use data.hookpoint and "
         "data.target_hookpoint"),
    ]
    for ok, name, value, msg in checks:
        if not ok:
            raise ValueError(f"data.{name}={value!r} {msg}")
