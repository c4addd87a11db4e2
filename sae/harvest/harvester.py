"""The harvester: run the model over context batches and collect hook point activations.

Hooks store each hook point's tensor; the hook that completes the set raises a private
exception, so the forward stops right after the deepest hook point (later layers never run).
All under ``torch.inference_mode``. Rows are then filtered (padding always, special tokens and
position 0 by config) and returned as a :class:`Chunk` with the token id, position and context
index of every row. Consumers: ``sae.runners.harvest`` (to disk) and ``sae.buffer.live`` (no disk).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sae.prefetch import prefetched

from .config import HarvestConfig, TextConfig
from .hookpoints import HookPoint, resolve_hookpoints
from .model import LoadedModel
from .text import ContextBatch, iter_batches, iter_contexts, special_ids


class Chunk(NamedTuple):
    """Activation rows of one or more contexts, in (context, position) order."""

    acts: dict[str, Tensor]
    """hook point -> [N, D] activations (CPU, model dtype)."""
    token_ids: Tensor
    """[N] int32 token id of each row."""
    positions: Tensor
    """[N] int32 position of each row in its context."""
    contexts: Tensor
    """[N] int64 context index of each row."""
    ready: Any = None
    """A CUDA event the activations' device-to-host copy completes at (None: they are ready);
    see :meth:`Harvester.checked`."""

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def select(self, rows: Tensor | slice) -> Chunk:
        """Rows by boolean mask, index tensor or slice (a mask or index reads the activations:
        only on a ready chunk)."""
        if self.ready is not None and not isinstance(rows, slice):
            raise RuntimeError("Chunk.select with a mask or index on activations still being copied; "
                               "call Harvester.checked(chunk) first")
        return Chunk({k: v[rows] for k, v in self.acts.items()}, self.token_ids[rows], self.positions[rows],
                     self.contexts[rows], self.ready)


def check_context_length(lm: LoadedModel, context_length: int) -> None:
    """Raise if contexts are longer than the model's position embeddings reach.

    Raises:
        ValueError: naming the model's limit and the setting to change.
    """
    cfg = lm.model.config
    limit = next((int(v) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                  if isinstance(v := getattr(cfg, k, None), int) and v > 0), None)
    if limit is not None and context_length > limit:
        raise ValueError(f"text.context_length={context_length} exceeds the {limit} positions of model "
                         f"{lm.info.get('name', '')!r} (its config's max_position_embeddings/n_positions); use "
                         f"text.context_length<={limit}")


def _to(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``; from the host to a GPU through pinned memory without waiting."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _StopForward(Exception):
    """Raised by the last hook to fire: everything needed has been captured."""


class Harvester:
    """Collect activations at ``hookpoints`` (patterns allowed) from a loaded model.

    Attributes:
        hookpoints: the resolved hook points, in pattern order.
        dims: hook point name -> width D of its activations.
    """

    def __init__(self, lm: LoadedModel, hookpoints: list[str], text: TextConfig, cfg: HarvestConfig):
        self.lm, self.text, self.cfg = lm, text, cfg
        check_context_length(lm, text.context_length)
        self.hookpoints: list[HookPoint] = resolve_hookpoints(lm.model, hookpoints)
        bos, eos, self.pad_id = special_ids(lm.tokenizer)
        specials = set(getattr(lm.tokenizer, "all_special_ids", [])) | {i for i in (bos, eos) if i is not None}
        specials.discard(lm.tokenizer.unk_token_id)
        self.special_ids = torch.tensor(sorted(specials), dtype=torch.long)
        self._lock = threading.Lock()  # hooks live on the shared model: one capture at a time
        # On CUDA the forward, row filtering and device-to-host copies run on a stream of their own,
        # so that in live training (harvest in a thread) the GPU overlaps them with the SAE's step.
        self._stream = torch.cuda.Stream(lm.device) if lm.device.type == "cuda" else None
        self._forward_kwargs = {}
        if "use_cache" in inspect.signature(lm.model.forward).parameters:
            self._forward_kwargs["use_cache"] = False
        probe = self.capture(torch.tensor([[bos if bos is not None else self.pad_id] * 2]),
                              torch.ones(1, 2, dtype=torch.long))
        self.dims = {name: int(t.shape[-1]) for name, t in probe.items()}

    @property
    def pipeline_depth(self) -> int:
        """``harvest.pipeline_depth`` resolved for the model's device (-1: 2 on CUDA, else 0)."""
        if self.cfg.pipeline_depth >= 0:
            return self.cfg.pipeline_depth
        return 2 if self.lm.device.type == "cuda" else 0

    @property
    def names(self) -> list[str]:
        return [hp.name for hp in self.hookpoints]

    def _hook(self, store: dict[str, Tensor], name: str, kind: str) -> Callable[..., None]:
        n_hooks = len(self.hookpoints)

        def save(value: Any) -> None:
            t = value[0] if isinstance(value, (tuple, list)) else value
            if not isinstance(t, Tensor) or t.dim() != 3:
                raise TypeError(f"hook point {name!r} gave {type(t).__name__} "
                                f"{tuple(getattr(t, 'shape', ()))}; expected a [batch, seq, d] tensor")
            store[name] = t
            if len(store) == n_hooks:
                raise _StopForward

        if kind == "input":
            return lambda module, args, kwargs: save(args[0] if args else kwargs["hidden_states"])
        return lambda module, args, output: save(output)

    def capture(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """Forward until every hook point has fired; return name -> [B, T, D] on the model device."""
        with self._lock:
            return self._capture_locked(input_ids, attention_mask)

    def _capture_locked(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        model, dev = self.lm.model, self.lm.device
        store: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        handles = []
        try:
            for hp in self.hookpoints:
                mod, hook = modules[hp.module], self._hook(store, hp.name, hp.kind)
                handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True) if hp.kind == "input"
                               else mod.register_forward_hook(hook))
            with torch.inference_mode():
                model(input_ids=_to(input_ids, dev), attention_mask=_to(attention_mask, dev), **self._forward_kwargs)
        except _StopForward:
            return store
        finally:
            for h in handles:
                h.remove()
        missing = [hp.name for hp in self.hookpoints if hp.name not in store]
        raise RuntimeError(f"the forward finished but hook points {missing} never ran; "
                           "they may sit in a branch this model does not execute")

    def harvest(self, batch: ContextBatch, *, wait: bool = True) -> Chunk:
        """Activations of the kept rows of one batch.

        ``wait=False`` (CUDA): the rows are copied to pinned host memory without waiting; the chunk
        carries the copy's event and must go through :meth:`checked` before its activations are
        read, so the next forward can start while the copy and the consumer's work proceed.

        Raises:
            ValueError: NaN/Inf activations, naming the hook point, context and position.
        """
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            chunk = self._harvest(batch)
        return self.checked(chunk) if wait else chunk

    def keep_mask(self, batch: ContextBatch) -> Tensor:
        """[B, T] bool: the positions whose rows are kept (no padding; no special tokens and no
        first position where ``harvest.drop_special`` / ``drop_first`` say so)."""
        keep = batch.attention_mask.bool()
        if self.cfg.drop_special and self.special_ids.numel():
            keep &= ~torch.isin(batch.input_ids, self.special_ids)
        if self.cfg.drop_first:
            keep[:, 0] = False
        return keep

    def _harvest(self, batch: ContextBatch) -> Chunk:
        acts = self.capture(batch.input_ids, batch.attention_mask)
        ids = batch.input_ids
        keep = self.keep_mask(batch)
        B, T = ids.shape
        positions = torch.arange(T, dtype=torch.int32).expand(B, T)[keep]
        contexts = batch.index[:, None].expand(B, T)[keep]
        ready = None
        if self.lm.device.type == "cuda":
            # No host wait: the kept rows' flat indices come from the host (a boolean mask on the
            # device would make the host wait for the forward), and non-blocking copies land in
            # pinned host memory; the event marks their completion.
            idx = _to(keep.view(-1).nonzero().squeeze(1), self.lm.device)
            rows = {name: t.reshape(B * T, -1).index_select(0, idx).to("cpu", non_blocking=True)
                    for name, t in acts.items()}
            ready = torch.cuda.Event()
            ready.record()  # on the harvester's stream (current here)
        else:
            rows = {name: t[keep] for name, t in acts.items()}
        return Chunk(rows, ids[keep].to(torch.int32), positions, contexts.to(torch.int64), ready)

    def checked(self, chunk: Chunk) -> Chunk:
        """``chunk`` once its activations are on the host (waits for the copy), checked for NaN/Inf.

        Raises:
            ValueError: NaN/Inf activations, naming the hook point, context and position.
        """
        if chunk.ready is not None:
            chunk.ready.synchronize()
            chunk = chunk._replace(ready=None)
        for name, x in chunk.acts.items():
            bad = ~torch.isfinite(x).all(dim=-1)
            if bool(bad.any()):
                first = int(bad.nonzero()[0])
                raise ValueError(
                    f"model produced NaN/Inf at hook point {name!r} in {int(bad.sum())} row(s) (first: context "
                    f"{int(chunk.contexts[first])}, position {int(chunk.positions[first])}); check model.dtype "
                    "(float16 overflow?) and the weights. Nothing from this batch was written"
                )
        return chunk

    def chunks(self, ds: Any, *, start_context: int = 0, select: Callable[[int], bool] | None = None,
               wait: bool = True) -> Iterator[Chunk]:
        """Harvest the dataset in batches of ``cfg.batch_size`` contexts, from ``start_context``.

        ``select(context_index)`` picks contexts (rank splits); batches group consecutive selected
        contexts, so the same arguments always give the same batches (bitwise-reproducible rows).
        Tokenisation runs :attr:`pipeline_depth` batches ahead in a thread. ``wait=False``: see
        :meth:`harvest`.
        """
        keep = (lambda i: i >= start_context and (select is None or select(i)))

        def batches() -> Iterator[ContextBatch]:
            contexts = iter_contexts(ds, self.lm.tokenizer, self.text)
            return iter_batches(contexts, self.cfg.batch_size, self.pad_id, keep)

        for batch in prefetched(batches, self.pipeline_depth):
            yield self.harvest(batch, wait=wait)
