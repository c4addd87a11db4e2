"""The activations of the peer benchmark: harvested once by our harvester, read by every system.

Part of ``python -m sae.bench.peers``. The packaged MiniLM (``all-MiniLM-L6-v2``) runs over the
built-in corpus (Python's own documentation prose) and the residual stream after block 3
(``layers.3``, d = 384) is kept for every non-special token. Contexts are split by index: every
``heldout_every``-th context goes to the held-out split, the others to training, so evaluation
text is never trained on. Training rows are shuffled once with a fixed seed (as a shuffle buffer
would), so every system sees the same batches in the same order; held-out rows keep text order.

The file (safetensors, fp32): ``train`` [N, 384], N a multiple of the batch, and ``heldout``
[M, 384], with ``__metadata__["info"]`` describing model, hook point, corpus and split. When
the corpus has fewer training tokens than the budget, runners cycle over the file (epochs > 1)
and the report says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.harvester import Harvester
from sae.harvest.model import load_model
from sae.harvest.text import load_text_dataset

log = logging.getLogger(__name__)


def write_activation_file(path: str | Path, train: torch.Tensor, heldout: torch.Tensor, info: dict[str, Any]) -> Path:
    """Write the benchmark's activation file (fp32, contiguous) with ``info`` as JSON metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"train": train.float().contiguous(), "heldout": heldout.float().contiguous()}, str(tmp),
              metadata={"info": json.dumps(info)})
    tmp.replace(path)
    return path


def harvest_split(train_tokens: int, heldout_tokens: int, batch: int, *, hookpoint: str = "layers.3",
                  model: str = "all-MiniLM-L6-v2", heldout_every: int = 8,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Harvest until both splits are full (or the corpus ends); returns (train, heldout, info).

    ``train`` has ``min(train_tokens, available)`` rows rounded down to a multiple of ``batch``.

    Raises:
        ValueError: the corpus gives less than one batch of training rows or no held-out rows.
    """
    splits, info = harvest_splits(train_tokens, heldout_tokens, batch, hookpoints=[hookpoint], model=model,
                                  heldout_every=heldout_every, seed=seed)
    train, heldout = splits[hookpoint]
    return train, heldout, {**info, "hookpoint": hookpoint}


def harvest_splits(train_tokens: int, heldout_tokens: int, batch: int, *, hookpoints: list[str],
                   model: str = "all-MiniLM-L6-v2", context_length: int = 0, heldout_every: int = 8,
                   seed: int = 0) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """:func:`harvest_split` for several hook points of the same tokens (a transcoder's input and
    target): hook point -> (train, heldout), rows aligned across hook points, and the info."""
    text = TextConfig(context_length=context_length) if context_length else TextConfig()
    lm = load_model(ModelConfig(name=model, device="cpu", dtype="float32"))
    harvester = Harvester(lm, hookpoints, text, HarvestConfig(progress=False))
    train_parts: dict[str, list] = {hp: [] for hp in hookpoints}
    held_parts: dict[str, list] = {hp: [] for hp in hookpoints}
    n_train = n_held = 0
    for chunk in harvester.chunks(load_text_dataset(text)):
        held = chunk.contexts % heldout_every == heldout_every - 1
        for hp in hookpoints:
            acts = chunk.acts[hp].float()
            train_parts[hp].append(acts[~held])
            held_parts[hp].append(acts[held])
        n_train, n_held = n_train + int((~held).sum()), n_held + int(held.sum())
        if n_train >= train_tokens and n_held >= heldout_tokens:
            break
    keep = min(train_tokens, n_train) // batch * batch
    if keep == 0 or n_held == 0:
        raise ValueError(f"the corpus gave {n_train} training and {n_held} held-out rows; the benchmark needs at "
                         f"least one batch of {batch} and some held-out rows")
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:keep]
    splits = {hp: (torch.cat(train_parts[hp])[order], torch.cat(held_parts[hp])[:heldout_tokens])
              for hp in hookpoints}
    info = {"model": lm.info["name"], "model_path": lm.info["path"], "hookpoints": hookpoints, "corpus": text.name,
            "context_length": text.context_length, "heldout_every": heldout_every, "seed": seed,
            "train_rows": keep, "train_rows_available": n_train,
            "heldout_rows": int(splits[hookpoints[0]][1].shape[0]), "d": int(splits[hookpoints[0]][0].shape[1])}
    if keep < train_tokens:
        log.warning("the corpus has %d training rows, fewer than the budget of %d: runners will cycle over %d rows",
                    n_train, train_tokens, keep)
    return splits, info
