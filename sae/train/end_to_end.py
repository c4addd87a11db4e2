"""End-to-end training: the SAE spliced into the frozen model, trained on what the model does with it.

``train.loss=kl | ce | kl+mse`` (:class:`sae.train.config.TrainConfig`). A step:

1. :class:`ContextSource` yields whole contexts (a :class:`TokenBatch`, ``batch_size / context_length``
   of them): this rank's share of the text after the held-out contexts and ``data.live.skip_contexts``,
   shuffled within blocks of about ``data.live.mixing_tokens`` tokens; token ids only, so no buffer
   holds activations (none could hold what this needs: the model's whole forward).
2. :meth:`EndToEnd.prepare` runs the clean forward once (no gradient), per gradient-accumulation
   chunk of contexts: the rows of the SAE's input (a transcoder: and target) hook point at the
   positions the harvester keeps, normalised as the source normalises, and the clean next-token
   log-probabilities there. The rows make the step's :class:`StepBatch`, read like any ``Batch``
   (data-dependent init, NaN checks, the reconstruction term).
3. For each SAE the trainer runs its forward on those rows, then :meth:`EndToEnd.apply` runs the
   spliced forward: the write site's activation at the kept positions replaced by the SAE's output
   (mapped back to the model's scale), and adds

       kl  mean over kept positions of KL(p_clean || p_spliced), next-token distributions
       ce  mean next-token cross-entropy of the spliced model (kept positions followed by a token)

   to the loss: ``kl`` or ``ce``, plus ``mse_coefficient * fvu`` for ``kl+mse``, plus the family's
   other terms (AuxK, sparsity penalties, Matryoshka's nested reconstructions), which keep their
   meaning. The gradient reaches the SAE through the layers above the hook point; the model's
   parameters never require one (checked), so it is frozen.

The spliced forward runs only the transformer blocks from the write site on: the blocks wholly
below it hand on the clean forward's output (:meth:`EndToEnd._blocks_below`; nothing below the
write site requires a gradient, so nothing there keeps autograd state either way). The cost and
memory per token against MSE training: ``python -m sae.bench.end_to_end``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from itertools import islice
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.buffer.config import LiveConfig
from sae.buffer.live import LiveSource
from sae.buffer.mixing import seeded_perm
from sae.eval.lm import denormalize, load_eval_model
from sae.eval.splice import scored_positions, site_hook
from sae.harvest.hookpoints import find_blocks
from sae.harvest.model import LoadedModel
from sae.harvest.text import iter_batches, iter_contexts
from sae.models import ForwardOutput

from . import dist

END_TO_END = ("kl", "ce", "kl+mse")


class TokenBatch(NamedTuple):
    """One step's contexts."""

    input_ids: Tensor
    """[B, T] token ids, right-padded."""
    attention_mask: Tensor
    """[B, T] 1 for real tokens."""
    keep: Tensor
    """[B, T] bool: the positions the harvester keeps (replaced by the SAE and scored)."""


class SplicePart(NamedTuple):
    """One gradient-accumulation chunk of a step: its contexts and what the clean forward gave."""

    rows: slice
    """Its rows of the step's ``x`` / ``y``."""
    tokens: TokenBatch
    """Its contexts, on the model's device."""
    clean_logprobs: Tensor | None
    """[kept positions, vocabulary] clean next-token log-probabilities (for ``kl``)."""
    below: Any
    """The output of the last block the spliced forward need not run (:attr:`EndToEnd.skipped`), or None."""
    weights: tuple[float, float]
    """Per kept position (KL) and per scored position (CE): 1 / the step's count over every part and
    rank, times the parts and ranks whose losses the trainer averages, so the averaged gradient is
    that of the step's mean over all of its positions, however they fall into parts and ranks."""


class StepBatch(NamedTuple):
    """A step of end-to-end training, read by the trainer like a ``Batch``."""

    x: Tensor
    """[N, D] the SAE's input rows (normalised) at the kept positions of every context."""
    y: Tensor | None
    """[N, E] a transcoder's target rows (normalised); None for an SAE."""
    parts: list[SplicePart]
    tokens: int
    """Rows of the step over every data-parallel rank (their counts differ: kept positions)."""


def causal_lm_required(loss: str, model_name: str, kind: str) -> None:
    """Raise unless the model has a next-token distribution to keep (a causal LM)."""
    if kind != "causal_lm":
        raise ValueError(f"train.loss={loss} compares next-token distributions, but model {model_name!r} is an "
                         f"{kind} without a language-model head: the hook point's output cannot be run forward "
                         "to next-token predictions. Use train.loss=mse for this model")


class ContextSource(LiveSource):
    """Whole contexts for end-to-end training, from ``data=live``'s model and text.

    Held-out contexts, normalisation statistics and their batches are those of :class:`LiveSource`
    (the harvester runs the model's body, which shares its weights with :attr:`lm`, the model
    with its head). Position ``(block, steps emitted in it)`` is an exact resume point.
    """

    def __init__(self, cfg: LiveConfig, batch_size: int, *, hookpoint: str, target_hookpoint: str = "",
                 seed: int = 0, normalize: str = "none", rank: int = 0, world_size: int = 1, loss: str = "kl"):
        lm, kind = load_eval_model(cfg.model)
        causal_lm_required(loss, cfg.model.name, kind)
        T = cfg.text.context_length
        if batch_size % T:
            raise ValueError(f"train.batch_size={batch_size} with train.loss={loss}: a step reads whole contexts, so "
                             f"the batch must be a multiple of data.live.text.context_length={T} (e.g. "
                             f"train.batch_size={max(1, round(batch_size / T)) * T})")
        body = LoadedModel(lm.model.base_model, lm.tokenizer, lm.device, lm.info)
        super().__init__(cfg, batch_size, hookpoint=hookpoint, target_hookpoint=target_hookpoint, seed=seed,
                         normalize=normalize, prefetch=0, rank=rank, world_size=world_size, lm=body)
        self.lm, self.loss = lm, loss
        self.contexts_per_step = batch_size // T
        self.block_steps = max(1, math.ceil(cfg.mixing_tokens / batch_size))  # steps per shuffled block
        self.steps_budget = math.ceil(cfg.harvest.max_tokens / batch_size) if cfg.harvest.max_tokens else 0
        self.position = (0, 0)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "loss": self.loss, "batches": "contexts"}

    def __iter__(self) -> Iterator[TokenBatch]:
        block, done = self.position
        per = self.contexts_per_step
        n_block = per * self.block_steps  # this rank's contexts per block
        first = self.first_context + block * n_block * self.world_size
        contexts = (c for c in iter_contexts(self.ds, self.lm.tokenizer, self.cfg.text)
                    if c.index >= first and self._mine(c.index))
        while group := list(islice(contexts, n_block)):
            group = [group[i] for i in seeded_perm(len(group), self.seed, self.rank, block).tolist()]
            for step in range(done, math.ceil(len(group) / per)):
                if self.steps_budget and block * self.block_steps + step >= self.steps_budget:
                    return
                b = next(iter_batches(group[step * per:(step + 1) * per], per, self.harvester.pad_id))
                self.position = (block, step + 1)
                yield TokenBatch(b.input_ids, b.attention_mask, self.harvester.keep_mask(b))
            block, done = block + 1, 0

    def iter_into(self, alloc: Any) -> Iterator[TokenBatch]:
        """As ``iter`` (token ids: nothing to gather into pinned buffers), never LiveSource's rows."""
        return iter(self)

    def state_dict(self) -> dict[str, Any]:
        return {"block": self.position[0], "steps": self.position[1], "seed": self.seed,
                "world_size": self.world_size, "contexts_per_step": self.contexts_per_step,
                "block_steps": self.block_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = (self.seed, self.world_size, self.contexts_per_step, self.block_steps)
        theirs = tuple(state.get(k) for k in ("seed", "world_size", "contexts_per_step", "block_steps"))
        if theirs != mine:
            raise ValueError(f"context stream state (seed, world size, contexts per step, steps per block) = "
                             f"{theirs} does not match {mine}; resume with the same data.seed, world size, "
                             "train.batch_size, context length and data.live.mixing_tokens")
        self.position = (int(state["block"]), int(state["steps"]))


class EndToEnd:
    """The clean forward of a step, and each SAE's spliced forward and loss (module docstring)."""

    def __init__(self, source: ContextSource, loss: str, mse_coefficient: float = 1.0):
        if loss not in END_TO_END:
            raise ValueError(f"end-to-end loss {loss!r}: use one of {', '.join(END_TO_END)}")
        self.model, self.device = source.lm.model, source.lm.device
        trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the model must be frozen for train.loss={loss}; {len(trainable)} of its parameters "
                             f"require gradients (first: {trainable[0]}); call model.requires_grad_(False)")
        self.loss, self.mse_coefficient = loss, mse_coefficient
        hps = {hp.name: hp for hp in source.harvester.hookpoints}
        self.read = hps[source.hookpoint]
        self.write = hps[source.target_hookpoint or source.hookpoint]
        modules = dict(source.harvester.lm.model.named_modules())  # the body: the same modules as the head model's
        self.read_module, self.write_module = modules[self.read.module], modules[self.write.module]
        self.x_norm = source.x_norm
        self.y_norm = source.y_norm if source.target_hookpoint else source.x_norm
        self.transcoder = bool(source.target_hookpoint)
        self.forward_kwargs = {"use_cache": False} if "use_cache" in inspect.signature(
            self.model.forward).parameters else {}
        self.skipped = self._blocks_below(source.harvester.lm.model)

    def _blocks_below(self, body: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer blocks wholly before the write site (the block itself when the write site
        is its output): the spliced forward reuses the clean forward's output of the last of them
        instead of running them again (their outputs are those of the clean forward)."""
        path = find_blocks(body)
        if path is None or not self.write.module.startswith(path + "."):
            return []
        index = self.write.module[len(path) + 1:].split(".")[0]
        if not index.isdigit():
            return []
        whole = self.write.module == f"{path}.{index}" and self.write.kind == "output"
        blocks = dict(body.named_modules())[path]
        return list(blocks[: int(index) + (1 if whole else 0)])

    def _forward(self, tokens: TokenBatch) -> Tensor:
        return self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                          **self.forward_kwargs).logits

    @torch.no_grad()
    def prepare(self, batch: TokenBatch, chunks: int, data_parallel: bool = False) -> StepBatch:
        """The clean forward of ``batch``, in ``chunks`` parts of its contexts (gradient accumulation);
        ``data_parallel``: every rank prepares its own batch (the counts behind the losses' weights
        are all-reduced)."""
        parts, xs, ys, start, counts = [], [], [], 0, []
        for ids, mask, keep in zip(*(t.tensor_split(min(chunks, batch.input_ids.shape[0])) for t in batch)):
            if not bool(keep.any()):
                continue
            tokens = TokenBatch(ids.to(self.device), mask.to(self.device), keep.to(self.device))
            seen: dict[str, Any] = {}
            handles = [site_hook(self.read_module, self.read.kind, _capture(seen, "x", tokens.keep))]
            if self.transcoder:
                handles.append(site_hook(self.write_module, self.write.kind, _capture(seen, "y", tokens.keep)))
            if self.skipped:
                handles.append(self.skipped[-1].register_forward_hook(_keep_output(seen)))
            try:
                logits = self._forward(tokens)
            finally:
                for h in handles:
                    h.remove()
            n = int(tokens.keep.sum())
            xs.append(self.x_norm(seen["x"]))  # the captured rows are a copy already: normalised in place
            if self.transcoder:
                ys.append(self.y_norm(seen["y"]))
            clean = None
            if self.loss != "ce":  # finite where p = 0 (a masked vocabulary entry): p log p = 0 there
                clean = logits[tokens.keep].float().log_softmax(-1).clamp_min(torch.finfo(torch.float32).min / 2)
            parts.append(SplicePart(slice(start, start + n), tokens, clean, seen.get("below"), (0.0, 0.0)))
            counts.append([n, int(scored_positions(tokens.keep, tokens.attention_mask).sum())])
            start += n
        totals = torch.tensor(counts, dtype=torch.float64).sum(0) if counts else torch.zeros(2, dtype=torch.float64)
        world = dist.world_size() if data_parallel else 1
        if world > 1:
            dist.all_reduce_(totals)
        if totals[0] == 0:
            raise ValueError("no kept position in this step's contexts (all padding or dropped tokens): nothing to "
                             "splice; check data.live.text and harvest.drop_special / drop_first")
        if self.loss == "ce" and totals[1] == 0:
            raise ValueError("no kept position in this step is followed by a token: train.loss=ce has nothing to "
                             "score; use longer contexts (data.live.text.context_length)")
        scale = len(parts) * world
        weights = (scale / float(totals[0]), scale / float(max(totals[1], 1)))
        parts = [p._replace(weights=weights) for p in parts]
        return StepBatch(torch.cat(xs), torch.cat(ys) if ys else None, parts, int(totals[0]))

    def spliced_logits(self, x_hat: Tensor, part: SplicePart) -> Tensor:
        """The model's logits with the write site's kept positions replaced by ``x_hat`` (normalised
        rows, in kept-position order), differentiable with respect to ``x_hat``."""
        tokens = part.tokens
        recon = denormalize(self.y_norm, x_hat)
        fired = []

        def replace(v: Tensor) -> Tensor:
            new = v.clone()
            new[tokens.keep] = recon.to(v.dtype)
            fired.append(True)
            return new

        handle = site_hook(self.write_module, self.write.kind, replace)
        # The blocks below the write site hand on the clean forward's output instead of recomputing it.
        skipped = self.skipped if part.below is not None else []
        own = [blk.__dict__.get("forward") for blk in skipped]
        for blk in skipped:
            blk.forward = _constant(part.below)
        try:
            logits = self._forward(tokens)
        finally:
            handle.remove()
            for blk, fwd in zip(skipped, own):
                del blk.forward
                if fwd is not None:
                    blk.forward = fwd
        if not fired:
            raise RuntimeError(f"hook point {self.write.name!r} did not run in the model's forward: nothing was "
                               "spliced; choose a hook point on the path to the logits")
        return logits

    def apply(self, out: ForwardOutput, part: SplicePart) -> ForwardOutput:
        """``out`` (the SAE's forward on ``part``'s rows) with the end-to-end loss in ``losses``."""
        logits = self.spliced_logits(out.x_hat, part)
        losses = dict(out.losses)
        others = losses["loss"] - losses["fvu"]  # AuxK, sparsity penalties: they keep their meaning
        if self.loss == "ce":
            t = part.tokens
            scored = scored_positions(t.keep, t.attention_mask)
            total = F.cross_entropy(logits[:, :-1][scored].float(), t.input_ids[:, 1:][scored], reduction="sum")
            losses["ce"] = total.detach() / max(int(scored.sum()), 1)  # this part's mean, for the logs
            main = total * part.weights[1]
        else:
            total = kl_divergence(part.clean_logprobs, logits[part.tokens.keep].float())
            losses["kl"] = total.detach() / part.clean_logprobs.shape[0]
            main = total * part.weights[0]
        if self.loss == "kl+mse":
            main = main + self.mse_coefficient * losses["fvu"]
        losses["loss"] = main + others
        return out._replace(losses=losses)


def _capture(store: dict[str, Tensor], name: str, keep: Tensor):
    """A site hook that stores the kept rows of the activation (float32) as ``store[name]``."""
    def fn(t: Tensor) -> None:
        store[name] = t[keep].float()
    return fn


def _keep_output(store: dict[str, Any]):
    """A module forward hook that stores the module's output as ``store["below"]``."""
    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        store["below"] = output
    return hook


def _constant(value: Any):
    """A forward that ignores its inputs and returns ``value``."""
    def forward(*args: Any, **kwargs: Any) -> Any:
        return value
    return forward


def kl_divergence(clean_logprobs: Tensor, logits: Tensor) -> Tensor:
    """KL(p_clean || softmax(logits)) summed over the vocabulary and the rows. ``clean_logprobs``
    must be finite (clamped where p = 0, as :meth:`EndToEnd.prepare` does)."""
    return F.kl_div(logits.log_softmax(-1), clean_logprobs, reduction="sum", log_target=True)
