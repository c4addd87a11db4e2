"""Spliced-model fidelity: the model's outputs with the SAE's reconstruction in place of its hook point.

For each batch of contexts the model runs four times: clean; with the activation at the
*write* site replaced by the SAE's reconstruction of the activation at the *read* site; with it
zero-ablated; with it mean-ablated (the mean activation at that site). For an SAE read = write
(its hook point: a module's output, or its input for ``mlp_in``-style points); for a transcoder
read is its input hook point and write its target, so the module's *output* is replaced by the
transcoder's prediction from its input.

A cross-layer transcoder (:class:`CLTSplicer`, :func:`clt_splice_eval`) replaces every layer's MLP
output at once; zero and mean ablation then replace all of them too. The causal CLT runs as the
replacement model: each layer's codes come from its MLP input in the spliced forward itself (errors
of earlier layers propagate). The acausal crosscoder reads later layers, so its codes come from the
clean forward's MLP inputs.

Only positions the harvester keeps (no padding, and no special tokens / first position where its
rules drop them) are replaced and scored; the SAE never saw the others.

Causal LMs (per counted position t, predicting token t+1; t kept and t+1 a real token):
    ce_loss_<mode>        mean next-token cross-entropy
    ce_loss_recovered     (CE_zero - CE_sae) / (CE_zero - CE_clean)   (SAELens "CE loss score")
    ce_loss_recovered_mean  the same against mean ablation
    kl_div_<mode>         mean KL(p_clean || p_mode) of next-token distributions at kept positions
Encoder models (e.g. all-MiniLM-L6-v2):
    hidden_fvu_<mode>, hidden_cosine_<mode>   last hidden state at kept positions vs clean
    pooled_fvu_<mode>, pooled_cosine_<mode>   mean-pooled sentence embeddings (non-padding tokens)
    hidden_fvu_recovered  1 - hidden_fvu_sae / hidden_fvu_zero
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae.harvest.hookpoints import HookPoint, resolve_hookpoints

from .metrics import ReconstructionStats

MODES = ("sae", "zero", "mean")
Reconstructor = Callable[[Tensor], Tensor]
"""Raw read-site rows [N, D] -> raw write-site rows [N, E] (normalisation handled inside)."""


@dataclass
class SpliceBatch:
    input_ids: Tensor
    """[B, T] token ids, right-padded."""
    attention_mask: Tensor
    """[B, T] 1 for real tokens."""
    keep: Tensor
    """[B, T] bool, positions the harvester keeps: replaced and scored."""


def resolve_site(model: nn.Module, name: str) -> HookPoint:
    """One hook point of ``model`` by name; a module path of the base model also works on a model
    with a head (``h.3.mlp`` on a GPT2LMHeadModel).

    Raises:
        ValueError: the name matches nothing, or more than one hook point.
    """
    try:
        hits = resolve_hookpoints(model, [name])
    except ValueError:
        prefix = getattr(model, "base_model_prefix", "")
        if not prefix or not hasattr(model, prefix):
            raise
        hits = resolve_hookpoints(model, [f"{prefix}.{name}"])
    if len(hits) != 1:
        raise ValueError(f"hook point {name!r} matches {len(hits)} sites ({[h.name for h in hits]}); give one")
    return hits[0]


def first_tensor(value: Any) -> Tensor:
    """The activation tensor of a module's input or output (a tuple's or list's first element)."""
    return value[0] if isinstance(value, (tuple, list)) else value


def with_first(value: Any, t: Tensor) -> Any:
    """``value`` with its activation tensor (see :func:`first_tensor`) replaced by ``t``."""
    if isinstance(value, tuple):
        return (t, *value[1:])
    if isinstance(value, list):
        return [t, *value[1:]]
    return t


def site_hook(module: nn.Module, kind: str, fn: Callable[[Tensor], Tensor | None]):
    """Hook ``fn`` on a hook point of ``module`` (``kind`` input: its input, else its output):
    ``fn`` gets the activation tensor and returns a replacement, or None to leave it. Returns the
    handle to remove."""
    if kind == "input":
        def pre(mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, output):
        new = fn(first_tensor(output))
        return None if new is None else with_first(output, new)
    return module.register_forward_hook(post)


class Splicer:
    """Forward hooks that capture the read site and overwrite the write site at kept positions.

    Call :meth:`prepare` (mode clean | capture | sae | zero | mean, and the keep mask) before
    each forward.
    ``capture`` accumulates the sum and count of write-site rows (for the mean ablation).
    """

    def __init__(self, model: nn.Module, read: HookPoint, write: HookPoint, reconstruct: Reconstructor):
        self.read, self.write, self.reconstruct = read, write, reconstruct
        self.same_site = (read.module, read.kind) == (write.module, write.kind)
        self.mode, self.keep, self.mean = "clean", None, None
        self.x: Tensor | None = None
        self.sum: Tensor | None = None
        self.count = 0
        modules = dict(model.named_modules())
        self.handles = []
        if not self.same_site:
            self.handles.append(site_hook(modules[read.module], read.kind, self._on_read))
        self.handles.append(site_hook(modules[write.module], write.kind, self._on_write))

    def prepare(self, mode: str, keep: Tensor) -> None:
        self.mode, self.keep, self.x = mode, keep, None  # x from an earlier forward must never be reused

    def _on_read(self, x: Tensor) -> None:
        self.x = x

    def _on_write(self, v: Tensor) -> Tensor | None:
        if self.mode == "clean":
            return None
        keep = self.keep
        if self.mode == "capture":
            rows = v[keep].double()
            s = rows.sum(0)
            self.sum = s if self.sum is None else self.sum + s
            self.count += rows.shape[0]
            return None
        new = v.clone()
        if self.mode == "zero":
            new[keep] = 0
        elif self.mode == "mean":
            new[keep] = self.mean.to(v.device, v.dtype)
        else:
            x = v if self.same_site else self.x
            if x is None:
                raise RuntimeError(f"the transcoder's input {self.read.name!r} had not run when its target "
                                   f"{self.write.name!r} did; the input hook point must come earlier in the model")
            new[keep] = self.reconstruct(x[keep].float()).to(v.device, v.dtype)  # the SAE may sit elsewhere
        return new

    def captured_mean(self) -> Tensor:
        """Mean write-site row over the ``capture`` passes."""
        if self.count == 0:
            raise ValueError("no kept positions in the splice contexts: nothing to replace")
        return (self.sum / self.count).float()

    def set_mean(self, mean: Tensor, device: torch.device) -> None:
        self.mean = mean.to(device)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class CLTSplicer:
    """Every layer's MLP output replaced at once, by a cross-layer transcoder (:mod:`sae.models.clt`).

    ``inputs="replacement"`` (the causal CLT; Ameisen et al. 2025's replacement model): the forward
    runs layer by layer and group i's codes come from layer i's MLP input *in the spliced forward*
    (so reconstruction errors of earlier layers propagate, as when the CLT replaces the MLPs);
    output layer j gets ``decode_layer(j)`` of the groups computed so far. ``inputs="clean"`` (the
    acausal crosscoder, whose groups read every layer, later ones included): codes come from the MLP
    inputs of the clean forward of the same batch, which :func:`_score` always runs first.
    ``mean`` is a list of per-layer mean MLP outputs. Rows reach the CLT as harvested: a CLT trained
    on normalised rows comes with its normalisers folded in (:func:`sae.eval.clt.raw_clt`).
    """

    def __init__(self, model: nn.Module, reads: list[HookPoint], writes: list[HookPoint], clt: Any,
                 inputs: str = "replacement"):
        if inputs not in ("replacement", "clean"):
            raise ValueError(f"CLT splice inputs={inputs!r}; use replacement or clean")
        if inputs == "replacement" and getattr(clt, "acausal", False):
            raise ValueError("the acausal crosscoder reads later layers: splice it with inputs='clean'")
        self.clt, self.inputs = clt, inputs
        self.mode, self.keep, self.mean = "clean", None, None
        n = len(reads)
        self.codes: list[Tensor | None] = [None] * n
        self.clean_x: list[Tensor | None] = [None] * n
        self.sums: list[Tensor | None] = [None] * n
        self.counts = [0] * n
        modules = dict(model.named_modules())
        self.handles = []
        for i, (r, w) in enumerate(zip(reads, writes)):
            self.handles.append(site_hook(modules[r.module], r.kind, lambda x, i=i: self._on_read(i, x)))
            self.handles.append(site_hook(modules[w.module], w.kind, lambda v, j=i: self._on_write(j, v)))

    @property
    def count(self) -> int:
        return min(self.counts)

    def prepare(self, mode: str, keep: Tensor) -> None:
        self.mode, self.keep = mode, keep
        self.codes = [None] * len(self.codes)
        if mode == "clean":
            self.clean_x = [None] * len(self.clean_x)
        elif mode == "sae" and self.inputs == "clean":
            if any(x is None for x in self.clean_x):
                raise RuntimeError("the clean forward of this batch did not reach every layer's MLP input")
            self.codes = self.clt.encode_layers([x.to(next(self.clt.parameters()).device) for x in self.clean_x],
                                                sparse=True)

    def _on_read(self, i: int, x: Tensor) -> None:
        if self.mode == "clean" and self.inputs == "clean":
            self.clean_x[i] = x[self.keep].float()
        elif self.mode == "sae" and self.inputs == "replacement":
            self.codes[i] = self.clt.encode_layer(i, x[self.keep].float().to(next(self.clt.parameters()).device),
                                                  sparse=True)  # TopK families: no [rows, L] codes per layer

    def _on_write(self, j: int, v: Tensor) -> Tensor | None:
        keep = self.keep
        if self.mode == "clean":
            return None
        if self.mode == "capture":
            rows = v[keep].double()
            self.sums[j] = rows.sum(0) if self.sums[j] is None else self.sums[j] + rows.sum(0)
            self.counts[j] += rows.shape[0]
            return None
        new = v.clone()
        if self.mode == "zero":
            new[keep] = 0
        elif self.mode == "mean":
            new[keep] = self.mean[j].to(v.device, v.dtype)
        else:
            new[keep] = self.clt.decode_layer(j, self.codes).to(v.device, v.dtype)
        return new

    def captured_mean(self) -> list[Tensor]:
        if self.count == 0:
            raise ValueError("no kept positions in the splice contexts: nothing to replace")
        return [(s / c).float() for s, c in zip(self.sums, self.counts)]

    def set_mean(self, mean: list[Tensor], device: torch.device) -> None:
        self.mean = [m.to(device) for m in mean]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def scored_positions(keep: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, T - 1] where next-token CE is scored: kept positions followed by a real token."""
    return keep[:, :-1] & attention_mask[:, 1:].bool()


def _forward(model: nn.Module, b: SpliceBatch, device: torch.device) -> Any:
    return model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device))


#: Elements of one [positions, vocabulary] slice scored at a time: each float64 temporary is
#: 128 MiB (a KL slice holds about six at once), however long the contexts and large the
#: vocabulary (a whole [B, T, V] batch in float64 is 8.4 GB for 8 x 1024 tokens of a 128k vocabulary).
SCORE_CHUNK_ELEMENTS = 2**24


def _slices(logits: Tensor, length: int):
    """(sequence, first position, last + 1) slices of ``logits`` [B, T, V] over ``length`` positions."""
    step = max(1, SCORE_CHUNK_ELEMENTS // logits.shape[-1])
    for i in range(logits.shape[0]):
        for t0 in range(0, length, step):
            yield i, t0, min(length, t0 + step)


class _CausalScores:
    """Sums of CE and KL over counted positions, per mode (float64, scored in bounded slices)."""

    def __init__(self):
        self.ce = dict.fromkeys(("clean", *MODES), 0.0)
        self.kl = dict.fromkeys(MODES, 0.0)
        self.n_ce = self.n_kl = 0

    def add_clean(self, logits: Tensor, b: SpliceBatch) -> tuple[Tensor, Tensor, Tensor]:
        dev = logits.device
        mask, keep, ids = b.attention_mask.to(dev).bool(), b.keep.to(dev), b.input_ids.to(dev)
        counted = scored_positions(keep, mask)
        self.ce["clean"] += self._ce(logits, ids, counted)
        self.n_ce += int(counted.sum())
        self.n_kl += int(keep.sum())
        return logits, counted, keep

    @staticmethod
    def _ce(logits: Tensor, ids: Tensor, counted: Tensor) -> float:
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for i, a, z in _slices(logits, logits.shape[1] - 1):
            lp = logits[i, a:z].double().log_softmax(-1)
            nll = -lp.gather(-1, ids[i, a + 1:z + 1, None]).squeeze(-1)
            total += torch.where(counted[i, a:z], nll, 0.0).sum()
        return total.item()

    def add(self, mode: str, logits: Tensor, clean: tuple[Tensor, Tensor, Tensor], ids: Tensor) -> None:
        clean_logits, counted, keep = clean
        self.ce[mode] += self._ce(logits, ids.to(logits.device), counted)
        total = torch.zeros((), dtype=torch.float64, device=logits.device)
        for i, a, z in _slices(logits, logits.shape[1]):
            lp_clean = clean_logits[i, a:z].double().log_softmax(-1)
            lp = logits[i, a:z].double().log_softmax(-1)
            p = lp_clean.exp()
            kl = torch.where(p > 0, p * (lp_clean - lp), 0.0).sum(-1)  # 0 log 0 = 0 (a -inf logit, masked vocab)
            total += torch.where(keep[i, a:z], kl, 0.0).sum()
        self.kl[mode] += total.item()

    def result(self) -> dict[str, float]:
        if self.n_ce == 0:
            raise ValueError("no scored positions in the splice contexts (every position dropped or padding)")
        ce = {m: v / self.n_ce for m, v in self.ce.items()}
        out = {f"ce_loss_{m}": v for m, v in ce.items()}
        out.update({f"kl_div_{m}": v / max(self.n_kl, 1) for m, v in self.kl.items()})
        for abl, key in (("zero", "ce_loss_recovered"), ("mean", "ce_loss_recovered_mean")):
            gap = ce[abl] - ce["clean"]
            out[key] = (ce[abl] - ce["sae"]) / gap if gap != 0 else float("nan")
        # SAEBench's normalized KL score: the share of the zero ablation's KL the SAE avoids.
        kz = out.get("kl_div_zero", 0.0)
        out["kl_div_score"] = (kz - out["kl_div_sae"]) / kz if kz else float("nan")
        out["tokens"] = float(self.n_ce)
        return out


class _EncoderScores:
    """Last-hidden-state and pooled-embedding agreement with the clean run, per mode."""

    def __init__(self):
        self.hidden = {m: ReconstructionStats() for m in MODES}
        self.pooled = {m: ReconstructionStats() for m in MODES}
        self.n = 0

    @staticmethod
    def _pool(h: Tensor, mask: Tensor) -> Tensor:
        m = mask.to(h.device, h.dtype)[..., None]
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def add(self, mode: str, h: Tensor, h_clean: Tensor, b: SpliceBatch) -> None:
        keep = b.keep.to(h.device)
        self.hidden[mode].update(h[keep].float(), h_clean[keep].float())
        self.pooled[mode].update(self._pool(h.float(), b.attention_mask), self._pool(h_clean.float(), b.attention_mask))
        if mode == MODES[0]:
            self.n += int(keep.sum())

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no scored positions in the splice contexts (every position dropped or padding)")
        out: dict[str, float] = {}
        for m in MODES:
            out[f"hidden_fvu_{m}"], out[f"hidden_cosine_{m}"] = self.hidden[m].fvu, self.hidden[m].cosine
            out[f"pooled_fvu_{m}"], out[f"pooled_cosine_{m}"] = self.pooled[m].fvu, self.pooled[m].cosine
        zero = out["hidden_fvu_zero"]
        out["hidden_fvu_recovered"] = 1.0 - out["hidden_fvu_sae"] / zero if zero > 0 else float("nan")
        out["tokens"] = float(self.n)
        return out


@torch.inference_mode()
def splice_eval(model: nn.Module, read: HookPoint, write: HookPoint, reconstruct: Reconstructor,
                batches: Sequence[SpliceBatch], kind: str, device: torch.device | str = "cpu",
                mean: Tensor | None = None) -> dict[str, float]:
    """Spliced-model metrics over ``batches`` (see the module docstring for the keys).

    Args:
        model: a causal LM with a head (``kind="causal_lm"``, output ``.logits``) or an encoder
            (``kind="encoder"``, output ``.last_hidden_state``), in eval mode on ``device``.
        read, write: hook points of ``model`` (from :func:`resolve_site`); equal for an SAE.
        reconstruct: raw read-site rows -> raw write-site rows.
        mean: [E] write-site activation for the mean ablation; None computes it over ``batches``.

    Raises:
        ValueError: unknown ``kind`` or nothing to score.
    """
    _check_kind(kind)
    return _score(Splicer(model, read, write, reconstruct), model, batches, kind, torch.device(device), mean)


@torch.inference_mode()
def clt_splice_eval(model: nn.Module, reads: list[HookPoint], writes: list[HookPoint], clt: Any,
                    batches: Sequence[SpliceBatch], kind: str, device: torch.device | str = "cpu",
                    mean: list[Tensor] | None = None, inputs: str = "replacement") -> dict[str, float]:
    """Spliced-model metrics with every MLP output replaced by a CLT's reconstruction (see
    :class:`CLTSplicer`); zero and mean ablations replace every one of those MLP outputs too.

    Args:
        reads, writes: per CLT layer, its MLP input and MLP output hook points of ``model``.
        clt: a :class:`sae.models.clt.CrossLayerTranscoder` in eval mode on ``device``.
        mean: per layer, the mean MLP output for the mean ablation; None computes it over ``batches``.
        inputs: replacement (the codes of each layer from the spliced forward) or clean.
    """
    _check_kind(kind)
    if len(reads) != len(writes) or len(reads) != clt.n_layers:
        raise ValueError(f"{len(reads)} read and {len(writes)} write sites for a CLT of {clt.n_layers} layers")
    return _score(CLTSplicer(model, reads, writes, clt, inputs), model, batches, kind, torch.device(device), mean)


def _check_kind(kind: str) -> None:
    if kind not in ("causal_lm", "encoder"):
        raise ValueError(f"splice kind {kind!r} must be causal_lm or encoder")


def _score(splicer: Splicer | CLTSplicer, model: nn.Module, batches: Sequence[SpliceBatch], kind: str,
           device: torch.device, mean: Any) -> dict[str, float]:
    """Clean, spliced, zero- and mean-ablated forwards of every batch, scored against the clean one."""
    try:
        if mean is None:
            for b in batches:
                splicer.prepare("capture", b.keep.to(device))
                _forward(model, b, device)
            mean = splicer.captured_mean()
        splicer.set_mean(mean, device)
        scores = _CausalScores() if kind == "causal_lm" else _EncoderScores()
        for b in batches:
            keep = b.keep.to(device)
            splicer.prepare("clean", keep)
            out = _forward(model, b, device)
            if kind == "causal_lm":
                clean = scores.add_clean(out.logits, b)
            else:
                h_clean = out.last_hidden_state
            for m in MODES:
                splicer.prepare(m, keep)
                out = _forward(model, b, device)
                if kind == "causal_lm":
                    scores.add(m, out.logits, clean, b.input_ids)
                else:
                    scores.add(m, out.last_hidden_state, h_clean, b)
        return scores.result()
    finally:
        splicer.remove()
