"""Config of the eval stage (``sae-eval``): what to evaluate, on which tokens, and what to report.

Empty strings mean "as the SAE was trained": the SAE's ``cfg.json`` records its data section
(source, buffer path, hook points, live model/text), so ``sae-eval sae_path=runs/x/final/topk``
alone evaluates on the held-out shards of the buffer it was trained on. Validation lives in
:func:`validate_eval`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SOURCES = ("", "buffer", "live", "synthetic")
SPLICE_KINDS = ("auto", "causal_lm", "encoder")


@dataclass
class SpliceConfig:
    """Spliced-model fidelity: run the model with the SAE's reconstruction at its hook point."""

    enabled: bool = True
    contexts: int = 32  # token contexts scored (each forward runs 4 times: clean, SAE, zero, mean)
    batch_size: int = 8  # contexts per forward pass
    kind: str = "auto"  # auto (from the model config) | causal_lm (CE, KL) | encoder (hidden states, pooled)
    # A model's transcoders (a circuit-tracer folder): the first context of the text scored; the
    # contexts trained on are those after data.live.heldout_contexts, so 0 is held out for a live run.
    first_context: int = 0


#: A fixed set of short prompts for graph scores, so that runs compare on the same prompts.
GRAPH_PROMPTS = ("The capital of France is", "The opposite of hot is", "1, 2, 3, 4, 5,",
                 "To open a file in Python, call")


@dataclass
class GraphConfig:
    """Attribution graphs by circuit-tracer (a model's transcoders in a circuit-tracer folder only):
    the mean replacement and completeness scores over ``prompts`` (sae.use.graph)."""

    enabled: bool = True
    prompts: list[str] = field(default_factory=lambda: list(GRAPH_PROMPTS))
    max_feature_nodes: int = 1024
    batch_size: int = 256  # source nodes per backward pass


@dataclass
class ExamplesConfig:
    """Top-activating contexts for a sample of latents."""

    num_latents: int = 12  # latents shown, spread over the firing-frequency range of live latents
    per_latent: int = 6  # contexts per latent (one per context, the strongest activation)
    before: int = 12  # tokens shown before the activating token
    after: int = 4  # tokens shown after it
    seed: int = 0
    histogram_bins: int = 24  # bins of each latent's activation histogram
    logit_tokens: int = 8  # promoted and suppressed tokens shown (causal LMs; 0: none)
    neighbours: int = 5  # nearest decoder neighbours shown (0: none)


@dataclass
class EvalConfig:
    # A final SAE folder (final/<name>/, with cfg.json), one SAE inside a checkpoint
    # (checkpoints/step_N/<name>/), or a folder holding exactly one such SAE.
    sae_path: str = ""
    out_dir: str = ""  # "" -> <sae_path>/eval
    source: str = ""  # "" (as trained) | buffer | live | synthetic
    buffer_path: str = ""  # "" -> the buffer the SAE was trained on
    shards: str = "heldout"  # heldout (the buffer's last data.buffer.heldout_shards shards, at least 1) | all
    max_tokens: int = 200_000  # evaluation rows (0: every row of the chosen shards)
    batch_size: int = 4096  # rows per SAE forward
    device: str = "auto"  # auto | cpu | cuda | cuda:N (the SAE and the model)
    dense_threshold: float = 0.1  # a latent is dense when it fires on more than this fraction of tokens
    dead_window_tokens: int = 0  # > 0: also report latents silent for this many tokens; 0: whole eval set only
    splice: SpliceConfig = field(default_factory=SpliceConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    examples: ExamplesConfig = field(default_factory=ExamplesConfig)
    # Feature statistics (mean max cosine between encoder rows / decoder rows): over this many
    # sampled latents, each compared with all of them (0: every latent; cost samples x L x d).
    feature_stats_latents: int = 4096
    plots: bool = True
    html: bool = True
    # Let the model of a live-trained SAE run its own Python (transformers' trust_remote_code). Only
    # ever from your command line or config: a setting recorded in an SAE's cfg.json is ignored.
    trust_remote_code: bool = False


def validate_eval(cfg: EvalConfig) -> None:
    """Raise ``ValueError`` naming the first bad field, its value, and the fix."""
    checks = [
        (bool(cfg.sae_path), "sae_path", cfg.sae_path, "must point at an SAE folder (e.g. runs/x/final/topk)"),
        (cfg.source in SOURCES, "source", cfg.source, "must be empty (as trained), buffer, live or synthetic"),
        (cfg.shards in ("heldout", "all"), "shards", cfg.shards, "must be heldout or all"),
        (cfg.max_tokens >= 0, "max_tokens", cfg.max_tokens, "must be >= 0 (0: every row)"),
        (cfg.batch_size > 0, "batch_size", cfg.batch_size, "must be > 0"),
        (0 < cfg.dense_threshold <= 1, "dense_threshold", cfg.dense_threshold, "must be in (0, 1]"),
        (cfg.dead_window_tokens >= 0, "dead_window_tokens", cfg.dead_window_tokens, "must be >= 0"),
        (cfg.feature_stats_latents >= 0, "feature_stats_latents", cfg.feature_stats_latents,
         "must be >= 0 (0: every latent)"),
        (cfg.splice.contexts > 0, "splice.contexts", cfg.splice.contexts, "must be > 0 (or splice.enabled=false)"),
        (cfg.splice.batch_size > 0, "splice.batch_size", cfg.splice.batch_size, "must be > 0"),
        (cfg.splice.first_context >= 0, "splice.first_context", cfg.splice.first_context, "must be >= 0"),
        (not cfg.graph.enabled or bool(cfg.graph.prompts), "graph.prompts", cfg.graph.prompts,
         "must hold a prompt (or graph.enabled=false)"),
        (cfg.graph.max_feature_nodes > 0, "graph.max_feature_nodes", cfg.graph.max_feature_nodes, "must be > 0"),
        (cfg.splice.kind in SPLICE_KINDS, "splice.kind", cfg.splice.kind, f"must be one of {', '.join(SPLICE_KINDS)}"),
        (cfg.examples.num_latents >= 0, "examples.num_latents", cfg.examples.num_latents, "must be >= 0"),
        (cfg.examples.per_latent > 0, "examples.per_latent", cfg.examples.per_latent, "must be > 0"),
        (cfg.examples.before >= 0 and cfg.examples.after >= 0, "examples.before", cfg.examples.before,
         "and examples.after must be >= 0"),
        (cfg.examples.histogram_bins > 0, "examples.histogram_bins", cfg.examples.histogram_bins, "must be > 0"),
        (cfg.examples.logit_tokens >= 0, "examples.logit_tokens", cfg.examples.logit_tokens, "must be >= 0"),
        (cfg.examples.neighbours >= 0, "examples.neighbours", cfg.examples.neighbours, "must be >= 0"),
    ]
    for ok, name, value, msg in checks:
        if not ok:
            raise ValueError(f"eval.{name}={value!r} {msg}")
