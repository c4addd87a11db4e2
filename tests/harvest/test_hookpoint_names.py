"""Hook point aliases and globs resolve to the right modules of each architecture family."""

from __future__ import annotations

import pytest
from transformers import AutoModel, BertConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

from sae.harvest.hookpoints import resolve_hookpoints

CONFIGS = {
    "gpt2": GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64),
    "llama": LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64),
    "gpt_neox": GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                              vocab_size=64),
    "bert": BertConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                       vocab_size=64),
}
# family -> alias -> (module, kind)
EXPECTED = {
    "gpt2": {"layers.2": ("h.2", "output"), "layers.1.mlp": ("h.1.mlp", "output"),
             "layers.1.mlp_in": ("h.1.mlp", "input"), "layers.0.attn": ("h.0.attn", "output")},
    "llama": {"layers.2": ("layers.2", "output"), "layers.1.mlp": ("layers.1.mlp", "output"),
              "layers.1.mlp_in": ("layers.1.mlp", "input"), "layers.0.attn": ("layers.0.self_attn", "output")},
    "gpt_neox": {"layers.2": ("layers.2", "output"), "layers.1.mlp": ("layers.1.mlp", "output"),
                 "layers.1.mlp_in": ("layers.1.mlp", "input"), "layers.0.attn": ("layers.0.attention", "output")},
    "bert": {"layers.2": ("encoder.layer.2", "output"), "layers.1.mlp": ("encoder.layer.1.output.dense", "output"),
             "layers.1.mlp_in": ("encoder.layer.1.intermediate", "input"),
             "layers.0.attn": ("encoder.layer.0.attention.output.dense", "output")},
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family_model(request):
    return request.param, AutoModel.from_config(CONFIGS[request.param])


def test_aliases_map_to_family_modules(family_model):
    family, model = family_model
    for alias, (module, kind) in EXPECTED[family].items():
        (hp,) = resolve_hookpoints(model, [alias])
        assert (hp.name, hp.module, hp.kind) == (alias, module, kind)


def test_globs_expand_segment_by_segment(family_model):
    _, model = family_model
    assert [hp.name for hp in resolve_hookpoints(model, ["layers.*"])] == ["layers.0", "layers.1", "layers.2"]
    assert [hp.name for hp in resolve_hookpoints(model, ["layers.[0-1].mlp"])] == ["layers.0.mlp", "layers.1.mlp"]
    both = resolve_hookpoints(model, ["layers.1.mlp_in", "layers.1.mlp", "layers.1.*"])
    assert [hp.name for hp in both] == ["layers.1.mlp_in", "layers.1.mlp", "layers.1.attn"]


def test_raw_module_names_and_base_model_prefix():
    model = AutoModel.from_config(CONFIGS["gpt2"])
    (raw,) = resolve_hookpoints(model, ["h.1.ln_2"])
    assert (raw.name, raw.module, raw.kind) == ("h.1.ln_2", "h.1.ln_2", "output")
    (prefixed,) = resolve_hookpoints(model, ["transformer.h.1"])  # the LM-head model's name for it
    assert prefixed.module == "h.1"
    # one module, two names: kept once
    assert len(resolve_hookpoints(model, ["layers.1", "h.1"])) == 1


def test_unknown_hookpoint_lists_close_matches():
    model = AutoModel.from_config(CONFIGS["llama"])
    with pytest.raises(ValueError, match=r"'layers.7' not found; model has layers.0..layers.2") as e:
        resolve_hookpoints(model, ["layers.7"])
    assert "close matches: layers.2, layers.1, layers.0" in str(e.value)
    with pytest.raises(ValueError, match=r"close matches: layers.1.mlp"):
        resolve_hookpoints(model, ["layers.1.mpl"])
    with pytest.raises(ValueError, match="no hook points"):
        resolve_hookpoints(model, [])
