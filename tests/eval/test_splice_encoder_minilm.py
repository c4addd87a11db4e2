"""Spliced-model fidelity on the packaged all-MiniLM-L6-v2 encoder: hidden states and pooled embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from sae.eval.lm import load_eval_model
from sae.eval.splice import SpliceBatch, resolve_site, splice_eval
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.harvester import Harvester
from sae.harvest.text import ContextBatch
from sae.models import SAEConfig, SparseCoder

SENTENCES = ["The cat sat on the mat.", "Sparse autoencoders find interpretable features in activations.",
             "Hello world"]


class IdentitySAE(SparseCoder):
    sparse_codes = False

    def __init__(self, d: int):
        super().__init__(SAEConfig(num_latents=d), d)

    def encode(self, x_BD: Tensor) -> Tensor:
        return x_BD

    def decode(self, codes: Tensor) -> Tensor:
        return codes


@pytest.fixture(scope="module")
def minilm():
    lm, kind = load_eval_model(ModelConfig(name="all-MiniLM-L6-v2", device="cpu"))
    harvester = Harvester(lm, ["layers.3"], TextConfig(), HarvestConfig(progress=False))
    enc = lm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    cb = ContextBatch(enc["input_ids"], enc["attention_mask"], torch.arange(len(SENTENCES)))
    return lm, kind, SpliceBatch(cb.input_ids, cb.attention_mask, harvester.keep_mask(cb))


def test_minilm_is_scored_as_an_encoder_and_special_tokens_are_not_kept(minilm):
    lm, kind, b = minilm
    assert kind == "encoder"
    tok = lm.tokenizer
    special = torch.isin(b.input_ids, torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]))
    assert not b.keep[special].any() and b.keep[~special].all()


def test_identity_matches_clean_and_zero_ablation_matches_a_hand_computation(minilm):
    lm, _, b = minilm
    site = resolve_site(lm.model, "layers.3")
    ident = IdentitySAE(384)
    m = splice_eval(lm.model, site, site, lambda x: ident.reconstruct(x, ident.encode(x)), [b], "encoder")
    assert m["hidden_fvu_sae"] == pytest.approx(0.0, abs=1e-10)
    assert m["hidden_cosine_sae"] == pytest.approx(1.0, abs=1e-6)
    assert m["pooled_cosine_sae"] == pytest.approx(1.0, abs=1e-6)
    assert m["hidden_fvu_recovered"] == pytest.approx(1.0, abs=1e-9)
    assert m["hidden_fvu_zero"] > 0.1 and m["pooled_cosine_zero"] < 0.99
    assert m["tokens"] == float(b.keep.sum())

    # Zero ablation by hand: layer 3's output zeroed at kept positions, mean pooling over non-padding tokens.
    def run(ablate: bool) -> tuple[Tensor, Tensor]:
        def hook(mod, args, out):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[b.keep] = 0
            return (h, *out[1:]) if isinstance(out, tuple) else h
        handle = lm.model.encoder.layer[3].register_forward_hook(hook) if ablate else None
        with torch.no_grad():
            h = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state.double()
        if handle:
            handle.remove()
        mask = b.attention_mask[..., None].double()
        return h, (h * mask).sum(1) / mask.sum(1)

    (h_clean, p_clean), (h_zero, p_zero) = run(False), run(True)
    cos = torch.nn.functional.cosine_similarity(p_zero, p_clean, dim=-1).mean().item()
    assert m["pooled_cosine_zero"] == pytest.approx(cos, rel=1e-5)
    hc, hz = h_clean[b.keep], h_zero[b.keep]
    fvu = ((hz - hc) ** 2).sum() / ((hc - hc.mean(0)) ** 2).sum()
    assert m["hidden_fvu_zero"] == pytest.approx(fvu.item(), rel=1e-5)
