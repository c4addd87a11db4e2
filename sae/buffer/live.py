"""LiveSource: the harvester feeds the trainer directly, without disk (harvest -> train).

Contexts ``[0, heldout_contexts)`` are held out (evaluation and normalisation statistics).
The rest are split across ranks (context ``c`` goes to rank ``(c - H) mod w``) and harvested in
blocks of whole forward batches holding about ``mixing_tokens`` rows; a block's rows are emitted
in a seeded random order (the bounded mixing buffer), in batches that may span blocks. The
harvest runs in the prefetch thread, one block ahead at most (on CUDA on the harvester's own
stream, so the device runs the model's forward alongside the SAE's step). Because block ``j`` always holds
the same contexts in the same forward batches, the position (block, rows before it, offset) is
an exact resume point: the block is harvested again and the emitted rows are skipped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from sae.harvest.config import validate_harvest
from sae.harvest.harvester import Chunk, Harvester
from sae.harvest.hookpoints import resolve_hookpoints
from sae.harvest.model import LoadedModel, load_model
from sae.harvest.text import load_text_dataset
from sae.prefetch import prefetched

from .config import DataConfig, LiveConfig
from .mixing import Alloc, Block, Position, assemble, plan_batches, seeded_perm
from .normalize import Normalizer, activation_sums
from .source import Batch


class LiveSource:
    """ActivationSource harvesting ``hookpoint`` (and ``target_hookpoint``) on the fly."""

    def identity(self) -> dict[str, Any]:
        """What a resume must match (see sae.train.run_dir): model, text and hook points."""
        out = {"source": "live", "model": dataclasses.asdict(self.cfg.model),
               "text": dataclasses.asdict(self.cfg.text), "hookpoints": self.hookpoints,
               "target_hookpoint": self.target_hookpoint, "normalize": self.x_norm.mode}
        if self.target_of:
            out["target_hookpoints"] = list(self.target_of.values())
        if self.cfg.skip_contexts:
            out["skip_contexts"] = self.cfg.skip_contexts
        return out

    def __init__(self, cfg: LiveConfig, batch_size: int, *, hookpoint: str = "", target_hookpoint: str = "",
                 hookpoints: list[str] | None = None, target_hookpoints: list[str] | None = None, seed: int = 0,
                 normalize: str = "none", prefetch: int = 4, rank: int = 0, world_size: int = 1,
                 lm: LoadedModel | None = None):
        """``lm``: the model, already loaded (default: ``load_model(cfg.model)``).

        ``hookpoints`` (several SAEs) with ``target_hookpoints``: one transcoder per pair, the i-th
        input hook point (patterns expanded in layer order) with the i-th target; every row then
        holds all inputs and targets side by side."""
        validate_harvest(cfg.model, cfg.text, cfg.harvest)
        if batch_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}: need batch_size > 0 "
                             "and 0 <= rank < world_size")
        if hookpoints and target_hookpoint:
            raise ValueError("data.hookpoints (one SAE per hook point) excludes data.target_hookpoint")
        if target_hookpoints and not hookpoints:
            raise ValueError("data.target_hookpoints pairs with data.hookpoints (one input per target)")
        lm = lm or load_model(cfg.model)
        wanted = list(hookpoints) if hookpoints else [hookpoint] + ([target_hookpoint] if target_hookpoint else [])
        self.target_of: dict[str, str] = {}  # input hook point -> its transcoder's target (target_hookpoints)
        if target_hookpoints:
            self.target_of = pair_hookpoints(lm, list(hookpoints), list(target_hookpoints))
            wanted = list(self.target_of) + list(self.target_of.values())
        self.harvester = Harvester(lm, wanted, cfg.text, cfg.harvest)
        if not hookpoints and len(self.harvester.names) != len(wanted):
            raise ValueError(f"data.hookpoint={hookpoint!r} / data.target_hookpoint={target_hookpoint!r} must each "
                             f"name one hook point; they resolve to {self.harvester.names}")
        # Several hook points: rows carry every hook point's activations (inputs, then any targets)
        # side by side in ``x`` (``columns``), so mixing and resume work as for one; :meth:`split`
        # cuts them apart.
        names = self.harvester.names
        self.hookpoints = (list(self.target_of) or names) if hookpoints else [names[0]]
        self.hookpoint = self.hookpoints[0]
        self.target_hookpoint = names[1] if target_hookpoint else ""
        self.dims = {hp: self.harvester.dims[hp] for hp in self.hookpoints}
        self.out_dims = {hp: self.harvester.dims[self.target_of.get(hp, hp)] for hp in self.hookpoints}
        self.columns, start = {}, 0
        for hp in self.hookpoints + list(self.target_of.values()):
            self.columns[hp] = slice(start, start + self.harvester.dims[hp])
            start += self.harvester.dims[hp]
        self.d_in = start
        self.d_out = self.harvester.dims[self.target_hookpoint] if target_hookpoint else self.d_in
        self.ds = load_text_dataset(cfg.text)
        self.cfg, self.batch_size, self.seed, self.prefetch = cfg, batch_size, seed, prefetch
        self.rank, self.world_size = rank, world_size
        per_block = math.ceil(cfg.mixing_tokens / cfg.text.context_length)
        self.block_contexts = math.ceil(per_block / cfg.harvest.batch_size) * cfg.harvest.batch_size
        self._heldout: Chunk | None = None
        self.x_norm = self.y_norm = Normalizer("none")
        self.norms = {hp: Normalizer("none") for hp in self.columns}
        if normalize not in ("none", "auto"):
            held = self._heldout_rows()
            self.norms = {hp: Normalizer.from_sums(normalize, activation_sums(held.acts[hp]),
                                                   f"held-out contexts at {hp}") for hp in self.columns}
            self.x_norm = self.norms[self.hookpoint]
            if self.target_hookpoint:
                self.y_norm = Normalizer.from_sums(normalize, activation_sums(held.acts[self.target_hookpoint]),
                                                   f"held-out contexts at {self.target_hookpoint}")
        self.position: Position = (0, 0, 0)  # (block, rows before it, offset in it)

    @classmethod
    def from_config(cls, data: DataConfig, batch_size: int, *, rank: int = 0, world_size: int = 1) -> LiveSource:
        return cls(data.live, batch_size, hookpoint=data.hookpoint, target_hookpoint=data.target_hookpoint,
                   hookpoints=list(data.hookpoints) or None, target_hookpoints=list(data.target_hookpoints) or None,
                   seed=data.seed, normalize=data.normalize,
                   prefetch=data.prefetch_batches, rank=rank, world_size=world_size)

    @property
    def normalization(self) -> dict[str, Any]:
        out = {"x": self.x_norm.as_dict()}
        if self.target_hookpoint:
            out["y"] = self.y_norm.as_dict()
        return out

    def split(self, x_BD: Tensor) -> dict[str, Tensor]:
        """Each hook point's columns of a (normalised) row block: views, no copy."""
        return {hp: x_BD[:, sl] for hp, sl in self.columns.items()}

    def _heldout_rows(self) -> Chunk:
        if self._heldout is None:
            held = self.cfg.heldout_contexts
            if held == 0:
                raise ValueError("data.live.heldout_contexts=0 leaves nothing to evaluate or to take normalisation "
                                 "statistics from; set it > 0")
            chunks = list(self.harvester.chunks(self.ds, select=lambda c: c < held))
            if not chunks:
                raise ValueError(f"text dataset {self.cfg.text.name!r} gave no tokens")
            self._heldout = Chunk({k: torch.cat([c.acts[k] for c in chunks]) for k in chunks[0].acts},
                                  *(torch.cat([getattr(c, f) for c in chunks]) for f in ("token_ids", "positions",
                                                                                           "contexts")))
        return self._heldout

    @property
    def first_context(self) -> int:
        """The first context trained on: after the held-out ones and ``skip_contexts``."""
        return self.cfg.heldout_contexts + self.cfg.skip_contexts

    def _mine(self, context: int) -> bool:
        first = self.first_context
        return context >= first and (context - first) % self.world_size == self.rank

    def _blocks(self, start: Position) -> Iterator[tuple[Block, int]]:
        block, rows_before, offset = start
        budget = self.cfg.harvest.max_tokens
        first = self.first_context + block * self.block_contexts * self.world_size
        chunks = self.harvester.chunks(self.ds, start_context=first, select=self._mine)
        per_block = self.block_contexts // self.cfg.harvest.batch_size
        while not budget or rows_before < budget:
            parts = [c for _, c in zip(range(per_block), chunks)]
            if not parts:
                return
            xs = [c.acts[self.hookpoint] if len(self.columns) == 1 else
                  torch.cat([c.acts[hp] for hp in self.columns], dim=1) for c in parts]
            ys = [c.acts[self.target_hookpoint] for c in parts] if self.target_hookpoint else None
            n = sum(x.shape[0] for x in xs)
            perm = seeded_perm(n, self.seed, self.rank, block)
            if budget:
                perm = perm[: budget - rows_before]
            yield Block((block, rows_before), xs, ys, perm), offset
            block, rows_before, offset = block + 1, rows_before + perm.numel(), 0

    def _normalize(self, batch: Batch) -> Batch:
        if len(self.columns) > 1:
            for hp, part in self.split(batch.x).items():
                self.norms[hp](part)  # in place on the column view
            return batch
        return Batch(self.x_norm(batch.x), None if batch.y is None else self.y_norm(batch.y))

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_into(None)

    def iter_into(self, alloc: Alloc | None) -> Iterator[Batch]:
        """As ``iter``, gathering each batch's rows into ``alloc``'s tensors (see ``assemble``)."""
        start = self.position
        for plan, end in prefetched(lambda: plan_batches(self._blocks(start), self.batch_size), self.prefetch):
            batch = assemble(plan, self._normalize, alloc=alloc)
            self.position = end
            yield batch

    def state_dict(self) -> dict[str, Any]:
        block, rows_before, offset = self.position
        return {"block": block, "rows_before": rows_before, "offset": offset, "seed": self.seed,
                "world_size": self.world_size, "block_contexts": self.block_contexts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = (self.seed, self.world_size, self.block_contexts)
        theirs = (state.get("seed"), state.get("world_size"), state.get("block_contexts"))
        if theirs != mine:
            raise ValueError(f"live state (seed, world size, block contexts) = {theirs} does not match {mine}; "
                             "resume with the same data.seed, world size, mixing_tokens and batch sizes")
        self.position = (int(state["block"]), int(state["rows_before"]), int(state["offset"]))

    def heldout_batches(self, n_batches: int) -> list[Batch]:
        """Up to ``n_batches`` batches of the held-out contexts, in order."""
        held = self._heldout_rows()
        x = held.acts[self.hookpoint] if len(self.columns) == 1 else \
            torch.cat([held.acts[hp] for hp in self.columns], dim=1)
        y = held.acts[self.target_hookpoint] if self.target_hookpoint else None
        out = []
        for a in range(0, min(x.shape[0], n_batches * self.batch_size), self.batch_size):
            xb = self._normalize(Batch(x[a:a + self.batch_size].float().clone())).x
            yb = None if y is None else self.y_norm(y[a:a + self.batch_size].float().clone())
            out.append(Batch(xb, yb))
        return out


def pair_hookpoints(lm: LoadedModel, inputs: list[str], targets: list[str]) -> dict[str, str]:
    """``data.hookpoints`` and ``data.target_hookpoints`` expanded (globs, in layer order) and
    paired in order: {input hook point: target}.

    Raises:
        ValueError: the two expand to different counts, or share a hook point.
    """
    ins = [hp.name for hp in resolve_hookpoints(lm.model, inputs)]
    outs = [hp.name for hp in resolve_hookpoints(lm.model, targets)]
    if len(ins) != len(outs):
        raise ValueError(f"data.hookpoints={inputs} expand to {len(ins)} hook points ({', '.join(ins[:3])}"
                         f"{', ...' if len(ins) > 3 else ''}) but data.target_hookpoints={targets} to {len(outs)} "
                         f"({', '.join(outs[:3])}{', ...' if len(outs) > 3 else ''}); each input needs one target, "
                         "paired in order (e.g. hookpoints=[layers.*.mlp_in] target_hookpoints=[layers.*.mlp])")
    both = sorted(set(ins) & set(outs))
    if both:
        raise ValueError(f"hook point(s) {both} are both an input (data.hookpoints) and a target "
                         "(data.target_hookpoints); a transcoder reads one hook point and reconstructs another")
    return dict(zip(ins, outs))
