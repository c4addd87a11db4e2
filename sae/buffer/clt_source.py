"""The cross-layer transcoder's data: every layer's MLP input and output from one harvest.

One ``sae-harvest 'hookpoints=[layers.*.mlp_in,layers.*.mlp]'`` writes a buffer whose shards hold
every layer's ``layers.N.mlp_in`` and ``layers.N.mlp`` for the same tokens. :class:`CLTSource`
opens one :class:`~sae.buffer.reader.ShardReader` per layer (input ``mlp_in``, target ``mlp``),
all with the same seed and rank split, so they step through the same rows in the same order (the
shuffle depends only on the seed, epoch, rank, window and row count, equal for every hook point)
and concatenates their batches: ``x`` = [mlp_in of layer 0 | ... | layer N-1], ``y`` = [mlp of
layer 0 | ... | layer N-1]. The trainer then sees an ordinary transcoder (x, y) source, so data
parallelism and resume work unchanged. With ``data=live`` (:class:`LiveCLTSource`) the same rows are
harvested while training, with nothing on disk.

Which layers: ``data.hookpoints`` (``layers.N`` or either of its two hook points, any order), else
every layer the buffer holds; a layer missing one of the two hook points is an error.

Normalisation (``data.normalize``, ``auto`` = ``scale``) is per layer: each reader maps its layer's
input and target with that hook point's own statistics, so every layer's input and target have a
mean squared norm of about d_model. The loss (a sum of per-layer FVUs) does not depend on the
scales, but Adam's steps do: on raw rows, where an MLP's output is ~100x smaller than its input,
a JumpReLU CLT on a toy GPT-2 ended with 92% dead latents and a TopK CLT at FVU 0.064; normalised,
0% dead and 0.038. cfg.json records the per-layer normalisers (``normalization.per_layer``), and
evaluation and export fold them into the weights (:meth:`~sae.models.clt.CrossLayerTranscoder.fold_normalization_`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import torch

from sae.models.registry import sae_class

from .config import DataConfig, validate_data
from .live import LiveSource
from .manifest import read_manifest
from .reader import ShardReader
from .source import Batch, source_identity

_HOOK = re.compile(r"^layers\.(\d+)(?:\.(mlp_in|mlp))?$")


def clt_hookpoints(held: list[str], wanted: list[str]) -> list[int]:
    """The layers a CLT reads from a buffer holding hook points ``held``, in layer order.

    Raises:
        ValueError: a wanted entry is not a layer or its MLP hook point; a layer lacks ``mlp_in``
            or ``mlp``; no layer has both.
    """
    have: dict[int, set[str]] = {}
    for hp in held:
        m = _HOOK.match(hp)
        if m and m.group(2):
            have.setdefault(int(m.group(1)), set()).add(m.group(2))
    if wanted:
        layers = set()
        for hp in wanted:
            m = _HOOK.match(hp)
            if not m:
                raise ValueError(f"data.hookpoints entry {hp!r} is not a layer for sae=clt; list layers as layers.N "
                                 "(or their layers.N.mlp_in / layers.N.mlp hook points)")
            layers.add(int(m.group(1)))
    else:
        layers = set(have)
    for layer in sorted(layers):
        missing = [h for h in ("mlp_in", "mlp") if h not in have.get(layer, set())]
        if missing:
            names = ", ".join(f"layers.{layer}.{h}" for h in missing)
            raise ValueError(f"sae=clt needs every layer's MLP input and output, but the buffer lacks {names} (it "
                             f"holds {held}); harvest both ('hookpoints=[layers.*.mlp_in,layers.*.mlp]') or list the "
                             "layers to use in data.hookpoints")
    if not layers:
        raise ValueError(f"the buffer holds no layers.N.mlp_in / layers.N.mlp pair (it holds {held}); harvest "
                         "'hookpoints=[layers.*.mlp_in,layers.*.mlp]' for sae=clt")
    return sorted(layers)


class _Layers:
    """What every CLT source tells the run about its layers."""

    layers: list[int]
    d_model: int

    @property
    def inputs(self) -> list[str]:
        return [f"layers.{i}.mlp_in" for i in self.layers]

    @property
    def targets(self) -> list[str]:
        return [f"layers.{i}.mlp" for i in self.layers]

    def meta(self) -> dict[str, Any]:
        """What the CLT's cfg.json records about its layers (evaluation reads it back)."""
        return {"layers": self.layers, "d_model": self.d_model, "inputs": self.inputs, "targets": self.targets}


class CLTSource(_Layers):
    """Concatenated per-layer batches ``Batch(x=[mlp_in...], y=[mlp...])`` from per-layer readers."""

    def __init__(self, readers: dict[int, Any]):
        if not readers:
            raise ValueError("no layer to read")
        self.readers = dict(sorted(readers.items()))
        self.layers = list(self.readers)
        dims = {(r.d_in, r.d_out) for r in self.readers.values()}
        if len(dims) != 1 or len({d for pair in dims for d in pair}) != 1:
            raise ValueError(f"the layers' MLP inputs and outputs must all have one width d_model; got "
                             f"{ {f'layers.{k}': (r.d_in, r.d_out) for k, r in self.readers.items()} }")
        self.d_model = next(iter(dims))[0]
        self.d_in = self.d_out = len(self.layers) * self.d_model
        first = next(iter(self.readers.values()))
        self.folder = getattr(first, "folder", None)

    def identity(self) -> dict[str, Any]:
        return {"source": "clt", "layers": self.layers,
                "readers": {str(i): source_identity(r) for i, r in self.readers.items()}}

    @staticmethod
    def _join(parts: list[Batch]) -> Batch:
        return Batch(torch.cat([p.x for p in parts], 1), torch.cat([p.y for p in parts], 1))

    def __iter__(self) -> Iterator[Batch]:
        iters = [iter(r) for r in self.readers.values()]
        while True:
            parts = [next(it, None) for it in iters]
            if any(p is None for p in parts):
                return
            yield self._join(parts)

    def state_dict(self) -> dict[str, Any]:
        return {str(i): r.state_dict() for i, r in self.readers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [i for i in self.readers if str(i) not in state]
        if missing:
            raise ValueError(f"the checkpoint's data state has no position for layer(s) {missing}")
        for i, r in self.readers.items():
            r.load_state_dict(state[str(i)])

    def heldout_batches(self, n_batches: int) -> list[Batch]:
        per_layer = [r.heldout_batches(n_batches) for r in self.readers.values()]
        return [self._join(list(parts)) for parts in zip(*per_layer)]

    @property
    def normalization(self) -> dict[str, Any]:
        """What the CLT's cfg.json records: each layer's input and target normaliser, in layer order."""
        return {"per_layer": [r.normalization for r in self.readers.values()]}


class LiveCLTSource(_Layers):
    """Every layer's MLP input and output harvested live (no buffer): one :class:`LiveSource` of
    ``layers.N.mlp_in`` paired with ``layers.N.mlp``, whose rows hold the inputs then the targets side
    by side, split into ``Batch(x=[mlp_in...], y=[mlp...])``. Each hook point is normalised with
    its own statistics (per layer, as :class:`CLTSource`); mixing, rank split and resume are the
    live source's."""

    def __init__(self, live: LiveSource):
        self.live = live
        self.layers = [int(hp.split(".")[1]) for hp in live.hookpoints]
        widths = {live.dims[hp] for hp in live.hookpoints} | set(live.out_dims.values())
        if len(widths) != 1:
            raise ValueError(f"the layers' MLP inputs and outputs must all have one width d_model; got "
                             f"{sorted(widths)}")
        self.d_model = widths.pop()
        self.d_in = self.d_out = len(self.layers) * self.d_model
        self.folder = None

    def identity(self) -> dict[str, Any]:
        return {"source": "clt", "layers": self.layers, "live": source_identity(self.live)}

    def _split(self, b: Batch) -> Batch:
        return Batch(b.x[:, : self.d_in].contiguous(), b.x[:, self.d_in:].contiguous())

    def __iter__(self) -> Iterator[Batch]:
        return (self._split(b) for b in self.live)

    def state_dict(self) -> dict[str, Any]:
        return self.live.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.live.load_state_dict(state)

    def heldout_batches(self, n_batches: int) -> list[Batch]:
        return [self._split(b) for b in self.live.heldout_batches(n_batches)]

    @property
    def normalization(self) -> dict[str, Any]:
        """Each layer's input and target normaliser, in layer order (as :class:`CLTSource`)."""
        norms = self.live.norms
        return {"per_layer": [{"x": norms[i].as_dict(), "y": norms[t].as_dict()}
                              for i, t in zip(self.inputs, self.targets)]}


def build_clt_source(data: DataConfig, batch_size: int, *, rank: int = 0,
                     world_size: int = 1) -> CLTSource | LiveCLTSource:
    """:class:`CLTSource` over ``data.buffer.path`` for ``data.hookpoints`` (or every layer), or
    :class:`LiveCLTSource` for ``data=live``.

    Raises:
        ValueError: not a buffer, or layers lacking a hook point.
    """
    validate_data(data)
    if data.source not in ("buffer", "live"):
        raise ValueError(f"data.source={data.source!r}: sae=clt trains on every layer's MLP input and output, "
                         "harvested into a buffer (data=buffer) or live (data=live)")
    # data=live's preset names a data.hookpoint; a CLT reads every layer (or data.hookpoints) instead.
    if data.target_hookpoint or data.target_hookpoints or (data.hookpoint and data.source == "buffer"):
        raise ValueError("sae=clt picks its hook points per layer; leave data.hookpoint, data.target_hookpoint and "
                         "data.target_hookpoints empty (choose layers with data.hookpoints=[layers.0,layers.1,...])")
    if data.source == "live":
        return _live_clt_source(data, batch_size, rank, world_size)
    layers = clt_hookpoints(read_manifest(data.buffer.path)["hookpoint_order"], list(data.hookpoints))
    one = dataclasses.replace(data, hookpoints=[])
    readers = {i: ShardReader.from_config(dataclasses.replace(one, hookpoint=f"layers.{i}.mlp_in",
                                                              target_hookpoint=f"layers.{i}.mlp"),
                                          batch_size, rank=rank, world_size=world_size)
               for i in layers}
    return CLTSource(readers)


def _live_clt_source(data: DataConfig, batch_size: int, rank: int, world_size: int) -> LiveCLTSource:
    """Every layer (or those of ``data.hookpoints``: ``layers.N`` or either MLP hook point) live."""
    if data.hookpoints:
        layers = sorted({int(m.group(1)) for hp in data.hookpoints if (m := _HOOK.match(hp))})
        bad = [hp for hp in data.hookpoints if not _HOOK.match(hp)]
        if bad:
            raise ValueError(f"data.hookpoints entry {bad[0]!r} is not a layer for sae=clt; list layers as layers.N")
        ins, outs = [f"layers.{i}.mlp_in" for i in layers], [f"layers.{i}.mlp" for i in layers]
    else:
        ins, outs = ["layers.*.mlp_in"], ["layers.*.mlp"]
    live = LiveSource(data.live, batch_size, hookpoints=ins, target_hookpoints=outs, seed=data.seed,
                      normalize=data.normalize, prefetch=data.prefetch_batches, rank=rank, world_size=world_size)
    return LiveCLTSource(live)


def clt_configs(cfgs: dict[str, Any], source: CLTSource) -> dict[str, Any]:
    """The run's SAE configs with ``clt_layers`` filled in from the source's layers.

    Raises:
        ValueError: a non-CLT config in the run, a ``clt_layers`` that disagrees with the buffer's
            layers, or ``transcode=false``.
    """
    n, out = len(source.layers), {}
    for name, c in cfgs.items():
        if not sae_class(c.architecture).cross_layer:
            raise ValueError(f"SAE {name!r} is {c.architecture!r}: a run with sae=clt trains only CLTs on the "
                             "concatenated layers; train other architectures in a run of their own")
        if c.clt_layers not in (0, n):
            raise ValueError(f"sae.clt_layers={c.clt_layers} but the buffer gives {n} layers {source.layers}; set "
                             "sae.clt_layers=0 (every layer) or choose the layers with data.hookpoints")
        if not c.transcode:
            raise ValueError("sae.transcode=false: a CLT maps MLP inputs to MLP outputs; set sae.transcode=true "
                             "(conf/sae_conf/sae/clt.yaml does)")
        out[name] = dataclasses.replace(c, clt_layers=n)
    return out
