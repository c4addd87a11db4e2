"""A tiny random GPT-2 and a TopK SAE trained briefly on its ``layers.0`` (live), for tests/use."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def steered_setup(tmp_path_factory, tiny_gpt2):
    from sae.eval.lm import load_eval_model
    from sae.export import load_pretrained
    from sae.harvest.config import ModelConfig
    from sae.runners.config import compose_train_config
    from sae.runners.train import run_training

    out = tmp_path_factory.mktemp("use")
    res = run_training(compose_train_config([
        "data=live", f"data.live.model.name={tiny_gpt2}", "data.live.text.context_length=32",
        "data.hookpoint=layers.0", "train=smoke", "train.steps=40", "train.batch_size=256", "train.progress=false",
        "sae.k=4", "sae.expansion_factor=4", "train.final_report=false", f"train.out_dir={out / 'run'}"]))
    lm, _ = load_eval_model(ModelConfig(name=str(tiny_gpt2), device="cpu"), "causal_lm")
    return lm.model, lm.tokenizer, load_pretrained(res.final_dirs["topk"]), res.final_dirs["topk"]
