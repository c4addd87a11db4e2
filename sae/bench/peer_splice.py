"""The peer benchmark's spliced-model fidelity: every system's SAE in the same causal LM's forward.

The held-out contexts of the benchmark's activations (every ``heldout_every``-th context of the
corpus, as :func:`sae.bench.peer_data.harvest_splits` splits them) are rebuilt from the text and run
through the model with each SAE's reconstruction in place of its hook point, by the evaluator's own
splice code (:func:`sae.eval.splice.splice_eval`): CE loss clean / spliced / zero-ablated, CE loss
recovered and the KL divergence of next-token distributions. Every system is scored on the same
tokens, its weights loaded by our importer.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Any

from sae.buffer.normalize import Normalizer
from sae.eval.lm import SAEReconstructor, load_eval_model
from sae.eval.splice import SpliceBatch, resolve_site, splice_eval
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.harvester import Harvester
from sae.harvest.hookpoints import HookPoint
from sae.harvest.text import iter_batches, iter_contexts, load_text_dataset
from sae.models import SparseCoder


@dataclass
class SpliceSetup:
    model: Any
    site: HookPoint
    batches: list[SpliceBatch]
    kind: str
    device: Any
    tokens: int


def splice_setup(model: str, hookpoint: str, heldout_every: int, contexts: int, batch_size: int = 8) -> SpliceSetup:
    """The model and ``contexts`` held-out contexts, batched as the evaluator splices them.

    Raises:
        ValueError: the model is not a causal LM (an encoder has no next-token loss to recover).
    """
    lm, kind = load_eval_model(ModelConfig(name=model, device="cpu", dtype="float32"))
    if kind != "causal_lm":
        raise ValueError(f"--splice-contexts needs a causal LM; {model} is an {kind} (use --splice-contexts 0)")
    text = TextConfig()
    harvester = Harvester(lm, [hookpoint], text, HarvestConfig(progress=False))
    held = (c for c in iter_contexts(load_text_dataset(text), lm.tokenizer, text)
            if c.index % heldout_every == heldout_every - 1)
    picked = list(islice(held, contexts))
    batches = [SpliceBatch(b.input_ids, b.attention_mask, harvester.keep_mask(b))
               for b in iter_batches(picked, batch_size, harvester.pad_id)]
    return SpliceSetup(lm.model, resolve_site(lm.model, hookpoint), batches, kind, lm.device,
                       int(sum(int(b.keep.sum()) for b in batches)))


def splice_metrics(setup: SpliceSetup, sae: SparseCoder) -> dict[str, float]:
    """CE loss recovered, KL and the CE losses of ``sae`` (raw activations in and out) spliced in."""
    m = splice_eval(setup.model, setup.site, setup.site,
                    SAEReconstructor(sae.to(setup.device).eval(), Normalizer("none"), Normalizer("none")),
                    setup.batches, setup.kind, setup.device)
    keys = ("ce_loss_clean", "ce_loss_sae", "ce_loss_zero", "ce_loss_recovered", "kl_div_sae")
    return {k: float(m[k]) for k in keys if k in m}
