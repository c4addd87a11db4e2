"""Evaluation tokens: activation rows (with token ids) and the contexts they came from.

Three places rows come from, mirroring training's ``data.source``:
    buffer     the held-out shards of a harvested buffer (``ShardReader``'s split), read in
               harvest order with their token ids, positions and context indices
    live       the live source's held-out contexts ``[0, heldout_contexts)``, harvested now
    synthetic  the toy model's held-out batches (no tokens: no splicing, no examples)
Rows are normalised as the SAE was trained (the ``normalization`` its cfg.json records).

For spliced evaluation, :func:`splice_batches` rebuilds the token contexts of the first eval
rows from the text (same tokenizer, packing and order as the harvest), checks them against the
stored token ids, and marks the positions the harvester keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from sae.buffer.manifest import read_manifest
from sae.buffer.normalize import Normalizer
from sae.buffer.reader import map_shard
from sae.harvest.config import HarvestConfig, TextConfig
from sae.harvest.harvester import Harvester
from sae.harvest.text import iter_batches, iter_contexts

from .splice import SpliceBatch

TOKEN_FIELDS = ("token_ids", "positions", "contexts")


@dataclass
class RowBatch:
    """Evaluation rows: normalised activations and, when known, where each row came from."""

    x: Tensor
    """[N, D] SAE input, normalised as in training (float32)."""
    y: Tensor | None = None
    """[N, E] transcoder target (None for SAEs)."""
    token_ids: Tensor | None = None
    """[N] token id of each row (None for synthetic data)."""
    positions: Tensor | None = None
    """[N] position of each row in its context."""
    contexts: Tensor | None = None
    """[N] context index of each row (rows of a context are consecutive, in position order)."""


@dataclass
class EvalSet:
    """Re-iterable evaluation rows (each pass reads them again: memory stays bounded)."""

    make: Callable[[], Iterator[RowBatch]]
    source: str
    """buffer | live | synthetic."""
    info: dict[str, Any] = field(default_factory=dict)
    """What the report records about the rows (buffer folder, shards, contexts)."""

    def __iter__(self) -> Iterator[RowBatch]:
        return self.make()


def _cap(batches: Iterator[RowBatch], max_tokens: int) -> Iterator[RowBatch]:
    seen = 0
    for b in batches:
        if max_tokens and seen + b.x.shape[0] > max_tokens:
            b = RowBatch(*(None if t is None else t[: max_tokens - seen] for t in (
                b.x, b.y, b.token_ids, b.positions, b.contexts)))
        if b.x.shape[0] == 0:
            return
        seen += b.x.shape[0]
        yield b
        if max_tokens and seen >= max_tokens:
            return  # without reading (or harvesting) one more batch


def _split(x: Tensor, y: Tensor | None, meta: dict[str, Tensor], batch_size: int, x_norm: Normalizer,
           y_norm: Normalizer) -> Iterator[RowBatch]:
    for a in range(0, x.shape[0], batch_size):
        sl = slice(a, a + batch_size)
        yield RowBatch(x_norm(x[sl].float().clone()), None if y is None else y_norm(y[sl].float().clone()),
                       *(meta[f][sl] if f in meta else None for f in TOKEN_FIELDS))


def buffer_rows(folder: str | Path, hookpoint: str, target_hookpoint: str, *, shards: str, heldout_shards: int,
                max_tokens: int, batch_size: int, x_norm: Normalizer, y_norm: Normalizer,
                verify: bool = True) -> EvalSet:
    """Rows of the buffer's held-out shards (the last ``max(heldout_shards, 1)``) or of all shards.

    Raises:
        FileNotFoundError / ValueError: not a buffer, an unknown hook point, or a corrupt shard.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    for hp in filter(None, (hookpoint, target_hookpoint)):
        if hp not in manifest["hookpoints"]:
            raise ValueError(f"hook point {hp!r} is not in buffer {folder}; it holds {manifest['hookpoint_order']}")
    n = len(manifest["shards"])
    if n == 0:
        raise ValueError(f"buffer {folder} has no complete shard yet; wait for the harvest or point elsewhere")
    chosen = list(range(n)) if shards == "all" else list(range(n - min(max(heldout_shards, 1), n), n))

    def make() -> Iterator[RowBatch]:
        def gen() -> Iterator[RowBatch]:
            for s in chosen:
                files = manifest["shards"][s]["files"]
                x = map_shard(folder / files[hookpoint]["path"], files[hookpoint], verify)
                y = map_shard(folder / files[target_hookpoint]["path"], files[target_hookpoint], verify) \
                    if target_hookpoint else None
                with safe_open(str(folder / files[hookpoint]["path"]), framework="pt") as fh:
                    meta = {f: fh.get_tensor(f) for f in TOKEN_FIELDS}
                yield from _split(x, y, meta, batch_size, x_norm, y_norm)
        return _cap(gen(), max_tokens)

    info = {"buffer": str(folder), "shards": chosen, "split": shards, "hookpoint": hookpoint,
            "target_hookpoint": target_hookpoint}
    return EvalSet(make, "buffer", info)


def live_rows(harvester: Harvester, ds: Any, hookpoint: str, target_hookpoint: str, *, contexts: int,
              max_tokens: int, batch_size: int, x_norm: Normalizer, y_norm: Normalizer) -> EvalSet:
    """Rows of contexts ``[0, contexts)`` (the live source's held-out contexts), harvested per pass."""
    if contexts <= 0:
        raise ValueError(f"data.live.heldout_contexts={contexts}: live evaluation needs held-out contexts (> 0)")

    def make() -> Iterator[RowBatch]:
        def gen() -> Iterator[RowBatch]:
            # islice stops the text after the held-out contexts (a select filter would scan it all).
            first = islice(iter_contexts(ds, harvester.lm.tokenizer, harvester.text), contexts)
            for batch in iter_batches(first, harvester.cfg.batch_size, harvester.pad_id):
                chunk = harvester.harvest(batch)
                meta = {f: getattr(chunk, f) for f in TOKEN_FIELDS}
                y = chunk.acts[target_hookpoint] if target_hookpoint else None
                yield from _split(chunk.acts[hookpoint], y, meta, batch_size, x_norm, y_norm)
        return _cap(gen(), max_tokens)

    return EvalSet(make, "live", {"contexts": contexts, "hookpoint": hookpoint,
                                  "target_hookpoint": target_hookpoint})


def synthetic_rows(synthetic_cfg: Any, *, max_tokens: int, batch_size: int) -> EvalSet:
    """The toy model's held-out batches (indices 10**9 + i, never used in training)."""
    from sae.buffer.synthetic import SyntheticSource

    src = SyntheticSource(synthetic_cfg, batch_size)
    n_batches = max(1, -(-(max_tokens or batch_size * 4) // batch_size))

    def make() -> Iterator[RowBatch]:
        return _cap((RowBatch(src.batch(10**9 + i).x) for i in range(n_batches)), max_tokens)

    return EvalSet(make, "synthetic", {"batches": n_batches, "features": src.features})


def text_config_from_manifest(manifest: dict[str, Any]) -> TextConfig:
    """The TextConfig a buffer was harvested with (dataset and packing sections of its manifest)."""
    ds, text = manifest["dataset"], manifest["text"]
    return TextConfig(name=ds["name"], config_name=ds.get("config_name", ""), split=ds.get("split", "train"),
                      data_files=list(ds.get("data_files") or []), column=ds.get("column", "text"),
                      revision=ds.get("revision", ""), context_length=int(text["context_length"]),
                      prepend_bos=bool(text["prepend_bos"]), pack=bool(text["pack"]))


def harvest_config_from_manifest(manifest: dict[str, Any]) -> HarvestConfig:
    h = manifest["harvest"]
    return HarvestConfig(batch_size=int(h["batch_size"]), drop_special=bool(h["drop_special"]),
                         drop_first=bool(h["drop_first"]), progress=False)


def first_contexts(rows: EvalSet, n: int) -> dict[int, tuple[Tensor, Tensor]]:
    """The first ``n`` distinct contexts of the eval rows: index -> (positions, token ids) stored."""
    found: dict[int, list[tuple[Tensor, Tensor]]] = {}
    for b in rows:
        if b.contexts is None:
            raise ValueError(f"{rows.source} rows carry no token ids; spliced evaluation needs a buffer or live model")
        for c in torch.unique_consecutive(b.contexts).tolist():
            if c not in found and len(found) == n:
                return {k: (torch.cat([p for p, _ in v]), torch.cat([t for _, t in v])) for k, v in found.items()}
            sel = b.contexts == c
            found.setdefault(c, []).append((b.positions[sel], b.token_ids[sel]))
    return {k: (torch.cat([p for p, _ in v]), torch.cat([t for _, t in v])) for k, v in found.items()}


def splice_batches(harvester: Harvester, text: TextConfig, ds: Any, wanted: dict[int, tuple[Tensor, Tensor]],
                   batch_size: int) -> list[SpliceBatch]:
    """Token contexts ``wanted`` rebuilt from the text, checked against the stored token ids.

    Raises:
        ValueError: a context is missing from the text, or its tokens differ from the stored
            ones (the dataset or tokenizer changed since the harvest).
    """
    if not wanted:
        raise ValueError("no contexts to splice: the eval rows are empty")
    last = max(wanted)
    picked = []
    for ctx in iter_contexts(ds, harvester.lm.tokenizer, text):
        if ctx.index in wanted:
            picked.append(ctx)
            positions, token_ids = wanted[ctx.index]
            ids = torch.tensor(ctx.ids)
            if int(positions.max()) >= len(ctx.ids) or not torch.equal(ids[positions.long()], token_ids.long()):
                raise ValueError(f"context {ctx.index} rebuilt from text {text.name!r} differs from the tokens stored "
                                 "with the activations; the dataset or tokenizer changed since the harvest. Evaluate "
                                 "without splicing (eval.splice.enabled=false) or re-harvest")
        if ctx.index >= last or len(picked) == len(wanted):
            break
    if len(picked) != len(wanted):
        missing = sorted(set(wanted) - {c.index for c in picked})[:5]
        raise ValueError(f"text {text.name!r} ended before contexts {missing}; it is not the text of these activations")
    return [SpliceBatch(b.input_ids, b.attention_mask, harvester.keep_mask(b))
            for b in iter_batches(picked, batch_size, harvester.pad_id)]
