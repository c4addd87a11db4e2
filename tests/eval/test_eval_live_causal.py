"""sae-eval's causal-LM path end to end: a tiny GPT-2 folder, live held-out contexts, a perfect TopK SAE.

A TopK SAE with W_enc = W_dec = [I; -I], no biases and k = d reconstructs every input exactly
(each dimension's positive or negative part is one latent), so through the whole pipeline
(model with LM head, live rows, contexts rebuilt from text, splicing) CE recovered is 1 and KL 0.
Its latents' decoder rows are +-e_i, so each dashboard's promoted tokens are the top entries of
one column of the unembedding (hand-checkable), and its report renders in headless Chromium.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae.buffer.config import DataConfig, LiveConfig
from sae.eval.config import EvalConfig, ExamplesConfig, SpliceConfig
from sae.harvest.config import ModelConfig, TextConfig
from sae.harvest.tiny import save_tiny_model
from sae.models import SAEConfig, build_sae
from sae.runners.evaluate import run_eval, summary_line
from sae.train.artifact import save_sae


@pytest.fixture(scope="module")
def perfect(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("perfect")
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
                                 examples=ExamplesConfig(num_latents=3, per_latent=2, logit_tokens=4, neighbours=3)))
    return model, result


def test_perfect_sae_recovers_all_ce_through_sae_eval(perfect):
    _, result = perfect
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


def test_dashboards_of_the_perfect_sae(perfect):
    from transformers import AutoModelForCausalLM

    model, result = perfect
    W_U = AutoModelForCausalLM.from_pretrained(model).get_output_embeddings().weight.detach()
    d = W_U.shape[1]
    assert "logit_tokens_skipped" not in result.report
    for le in result.report["examples"]:
        i, sign = le["latent"] % d, (1.0 if le["latent"] < d else -1.0)
        column = sign * W_U[:, i]  # W_U @ (+-e_i)
        assert [t["token_id"] for t in le["promoted"]] == column.topk(4).indices.tolist()
        assert [t["value"] for t in le["promoted"]] == pytest.approx(column.topk(4).values.tolist(), rel=1e-5)
        assert [t["token_id"] for t in le["suppressed"]] == column.topk(4, largest=False).indices.tolist()
        # +-e_i is orthogonal to every other row but its own negation (cosine -1, never a top-3 neighbour).
        assert len(le["neighbours"]) == 3 and all(n["cosine"] == pytest.approx(0.0) for n in le["neighbours"])
        assert (le["latent"] + d) % (2 * d) not in [n["latent"] for n in le["neighbours"]]
        h = le["histogram"]
        assert sum(h["counts"]) == round(le["frequency"] * result.report["metrics"]["tokens"])
        assert h["edges"][-1] == pytest.approx(le["max_activation"], rel=1e-6)


def test_causal_report_renders_in_headless_chromium(perfect, tmp_path):
    from sae.eval.screenshot import check_report, find_browser

    if find_browser() is None:
        pytest.skip("no Chromium on PATH: run `bash launch/setup.sh` as root (installs Debian chromium)")
    _, result = perfect
    check = check_report(result.report_html, tmp_path / "shot.png")
    n = len(result.report["examples"])
    assert check.ok and len(check.panel_boxes) == 3 * n and not check.blank, check  # histogram, tokens, neighbours
    page = result.report_html.read_text()
    assert page.count("class='chip up'") == 4 * n and page.count("class='chip down'") == 4 * n
