"""Several hook points at once, one SAE each: batches as ``{hook point: Batch}``.

- :class:`ZippedSource` (``data=buffer``): one :class:`~sae.buffer.reader.ShardReader` per hook
  point, stepped together. Under ``train.parallel=sae`` a rank opens only the hook points whose
  SAEs it owns, so each rank reads its own hook points.
- :class:`LiveHookpoints` (``data=live``): one harvest of every hook point (a
  :class:`~sae.buffer.live.LiveSource` whose rows hold all hook points side by side). Under
  ``train.parallel=sae`` with W ranks, every rank harvests its own 1/W share of the contexts (the
  model's forward passes are spread, not repeated) and an all-to-all after each step scatters the
  columns: rank r receives every rank's rows of the hook points it owns, so its SAEs see batches
  of ``train.batch_size`` rows. Per step each rank sends and receives ``(W - 1)/W`` of its
  batch's rows of the other ranks' hook points.

With ``data.target_hookpoints`` each SAE is a transcoder: its batch holds its input hook point's
rows and its target's (``Batch(x, y)``), keyed by the input hook point; in SAE parallel a rank
receives the targets of the inputs it owns as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from sae.buffer.live import LiveSource
from sae.buffer.source import Batch, source_identity

from . import dist


class ZippedSource:
    """One source per hook point, stepped together; stops when any of them ends."""

    def __init__(self, sources: dict[str, Any], all_dims: dict[str, int] | None = None,
                 all_out_dims: dict[str, int] | None = None):
        """``all_dims`` / ``all_out_dims``: input / output widths of every SAE's hook point of the
        run, also those other ranks read (output: the target's, for transcoders)."""
        if not sources:
            raise ValueError("no hook point to read")
        self.sources = sources
        self.dims = {hp: s.d_in for hp, s in sources.items()}
        self.all_dims = dict(all_dims or self.dims)
        self.all_out_dims = dict(all_out_dims or {hp: s.d_out for hp, s in sources.items()})
        self.hookpoints = list(sources)

    def identity(self) -> dict[str, Any]:
        """What a resume must match: each hook point's source."""
        return {"source": "hookpoints", "hookpoints": {hp: source_identity(s) for hp, s in self.sources.items()}}

    def __iter__(self) -> Iterator[dict[str, Batch]]:
        iters = {hp: iter(s) for hp, s in self.sources.items()}
        while True:
            try:
                yield {hp: next(it) for hp, it in iters.items()}
            except StopIteration:
                return

    def state_dict(self) -> dict[str, Any]:
        return {hp: s.state_dict() for hp, s in self.sources.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.sources) - set(state))
        if missing:
            raise ValueError(f"the checkpoint's data state has no position for hook point(s) {missing}")
        for hp, s in self.sources.items():
            s.load_state_dict(state[hp])

    def heldout_batches(self, n_batches: int) -> dict[str, list[Batch]]:
        return {hp: s.heldout_batches(n_batches) for hp, s in self.sources.items()}

    def normalization_of(self, hp: str) -> dict[str, Any]:
        return getattr(self.sources[hp], "normalization", {})


class LiveHookpoints:
    """Live harvest of several hook points; with ``exchange`` (SAE parallel), rows are
    all-to-all'ed so this rank gets all ranks' rows of the hook points in ``needs[rank]``."""

    def identity(self) -> dict[str, Any]:
        return source_identity(self.live)

    def __init__(self, live: LiveSource, needs: list[list[str]] | None = None):
        self.live = live
        self.dims = dict(live.dims)
        self.all_dims = self.dims
        self.all_out_dims = dict(live.out_dims)
        self.target_of = dict(live.target_of)
        self.hookpoints = list(live.hookpoints)
        self.needs = needs  # per rank: hook points it trains on; None: this process keeps all, no exchange
        if needs is not None:
            if len(needs) != dist.world_size():
                raise ValueError(f"hook point owners given for {len(needs)} ranks, world size is {dist.world_size()}")
            unknown = sorted({hp for n in needs for hp in n} - set(self.hookpoints))
            if unknown:
                raise ValueError(f"hook points {unknown} are not harvested ({self.hookpoints})")
        self.own = self.hookpoints if needs is None else needs[dist.rank()]

    def __iter__(self) -> Iterator[dict[str, Batch]]:
        it = iter(self.live)
        while True:
            batch = next(it, None)
            if self.needs is None:
                if batch is None:
                    return
                yield self._pairs(self.live.split(batch.x), self.hookpoints)
                continue
            # Every rank must take part in every exchange: agree on whether all have a batch, and
            # on its rows (the last batch of a finite budget may be short on some rank).
            n = batch.x.shape[0] if batch is not None else 0
            n_min = int(dist.all_reduce_(torch.tensor([n], dtype=torch.float64), "min").item())
            if n_min == 0:
                return
            yield self._exchange(self.live.split(batch.x[:n_min]))

    def _columns(self, hps: list[str]) -> list[str]:
        """The harvested columns the SAEs of ``hps`` read: their inputs, then their targets."""
        return list(hps) + [self.target_of[hp] for hp in hps if hp in self.target_of]

    def _pairs(self, parts: dict[str, torch.Tensor], hps: list[str]) -> dict[str, Batch]:
        """{input hook point: Batch(x, target or None)} from the columns in ``parts``."""
        out = {}
        for hp in hps:
            t = self.target_of.get(hp)
            out[hp] = Batch(parts[hp].contiguous(), None if t is None else parts[t].contiguous())
        return out

    def _exchange(self, parts: dict[str, torch.Tensor]) -> dict[str, Batch]:
        me = dist.rank()
        cols = [self._columns(hps) for hps in self.needs]
        widths = [sum(parts[c].shape[1] for c in cs) for cs in cols]
        n, wmax = next(iter(parts.values())).shape[0], max(widths)
        send = []
        for cs, w in zip(cols, widths):
            buf = torch.zeros(n, wmax)  # gloo's all-to-all wants equal shapes: pad to the widest
            if cs:
                torch.cat([parts[c] for c in cs], dim=1, out=buf[:, :w])
            send.append(buf)
        got = dist.all_to_all(send)
        rows = torch.cat([g[:, : widths[me]] for g in got])  # by sending rank
        mine, start = {}, 0
        for c in cols[me]:
            d = parts[c].shape[1]
            mine[c] = rows[:, start:start + d]
            start += d
        return self._pairs(mine, self.own)

    def state_dict(self) -> dict[str, Any]:
        return self.live.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.live.load_state_dict(state)

    def heldout_batches(self, n_batches: int) -> dict[str, list[Batch]]:
        """The held-out contexts (harvested alike on every rank) of this rank's hook points."""
        split = [self._pairs(self.live.split(b.x), self.own) for b in self.live.heldout_batches(n_batches)]
        return {hp: [s[hp] for s in split] for hp in self.own}

    def normalization_of(self, hp: str) -> dict[str, Any]:
        t = self.target_of.get(hp)
        return {"x": self.live.norms[hp].as_dict(), **({"y": self.live.norms[t].as_dict()} if t else {})}
