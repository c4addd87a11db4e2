"""sae-eval's causal-LM path end to end: a tiny GPT-2 folder, live held-out contexts, a perfect TopK SAE.

A TopK SAE with W_enc = W_dec = [I; -I], no biases and k = d reconstructs every input exactly
(each dimension's positive or negative part is one latent), so through the whole pipeline
(model with LM head, live rows, contexts rebuilt from text, splicing) CE recovered is 1 and KL 0.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae.buffer.config import DataConfig, LiveConfig
from sae.eval.config import EvalConfig, ExamplesConfig, SpliceConfig
from sae.eval.run import run_eval, summary_line
from sae.harvest.config import ModelConfig, TextConfig
from sae.harvest.tiny import save_tiny_model
from sae.models import SAEConfig, build_sae
from sae.train.artifact import save_sae


def test_perfect_sae_recovers_all_ce_through_sae_eval(tmp_path):
    model = save_tiny_model(tmp_path / "model", "gpt2", layers=2, hidden=32)
    docs = tmp_path / "docs.txt"
    docs.write_text("".join(f"Line {i}: a set keeps {i % 11} unique items in no order.\n" for i in range(200)))
    d = 32
    sae = build_sae(SAEConfig(k=d, num_latents=2 * d, b_dec_init="zeros"), d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    live = LiveConfig(model=ModelConfig(name=str(model), dtype="float32"),
                      text=TextConfig(name=str(docs), context_length=32), heldout_contexts=8)
    save_sae(sae, tmp_path / "run" / "final" / "topk",
             data=dataclasses.asdict(DataConfig(source="live", hookpoint="layers.0", live=live)))
    result = run_eval(EvalConfig(sae_path=str(tmp_path / "run"), device="cpu", splice=SpliceConfig(contexts=6),
                                 examples=ExamplesConfig(num_latents=3, per_latent=2)))
    r = result.report
    assert r["data"]["source"] == "live" and r["sae"]["hookpoint"] == "layers.0"
    assert r["metrics"]["fvu"] == pytest.approx(0.0, abs=1e-10)
    assert r["metrics"]["tokens"] > 100  # 8 held-out contexts of 32 tokens, special tokens dropped
    sp = r["splice"]
    assert sp["kind"] == "causal_lm" and sp["contexts"] == 6 and sp["write"] == "transformer.h.0"
    m = sp["metrics"]
    assert m["ce_loss_zero"] != m["ce_loss_clean"]
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert m["kl_div_sae"] == pytest.approx(0.0, abs=1e-9)
    assert len(r["examples"]) == 3 and all(le["examples"] for le in r["examples"])
    assert "CE recovered=1.000" in summary_line(result)
