"""LiveSource: harvest-while-training batches, rank split, held-out contexts, exact resume."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from sae.buffer.config import LiveConfig
from sae.buffer.live import LiveSource
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.tiny import save_tiny_model


@pytest.fixture(scope="module")
def live_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    model = save_tiny_model(root / "model", "llama", layers=2, hidden=32)
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Entry {i} says {i * 7 % 13} keys map to {i % 5} values."}) + "\n"
                            for i in range(150)))
    return LiveConfig(model=ModelConfig(name=str(model), device="cpu"), text=TextConfig(name=str(docs),
                      context_length=16), harvest=HarvestConfig(batch_size=4, progress=False), mixing_tokens=100,
                      heldout_contexts=8)


def rows(source, n=None):
    out = []
    for i, b in enumerate(source):
        out.append(b.x)
        if n is not None and i + 1 == n:
            break
    return out


def as_counter(x: torch.Tensor) -> Counter:
    return Counter(tuple(r) for r in x.numpy().round(5).tolist())


def test_ranks_split_contexts_and_heldout_is_separate(live_cfg):
    # Rows are compared as multisets: a causal model gives equal rows for equal prefixes.
    whole = torch.cat(rows(LiveSource(live_cfg, 40, hookpoint="layers.1")))
    parts = [torch.cat(rows(LiveSource(live_cfg, 40, hookpoint="layers.1", rank=r, world_size=2))) for r in range(2)]
    assert whole.shape[1] == 32 and parts[0].shape[0] + parts[1].shape[0] == whole.shape[0] > 1000
    assert abs(parts[0].shape[0] - parts[1].shape[0]) <= 2 * 15
    assert as_counter(parts[0]) + as_counter(parts[1]) == as_counter(whole)
    source = LiveSource(live_cfg, 40, hookpoint="layers.1")
    held = torch.cat([b.x for b in source.heldout_batches(100)])
    assert sorted(set(source._heldout_rows().contexts.tolist())) == list(range(8))
    assert 8 * 13 < held.shape[0] <= 8 * 15  # 8 contexts of 16 tokens less BOS and EOS rows
    no_holdout = LiveConfig(model=live_cfg.model, text=live_cfg.text, harvest=live_cfg.harvest, mixing_tokens=100,
                            heldout_contexts=0)
    everything = torch.cat(rows(LiveSource(no_holdout, 40, hookpoint="layers.1")))
    assert as_counter(held) + as_counter(whole) == as_counter(everything)
    assert len(source.heldout_batches(1)) == 1


def test_state_dict_resumes_the_live_stream_exactly(live_cfg):
    full = rows(LiveSource(live_cfg, 24, hookpoint="layers.1", seed=5), 30)
    source = LiveSource(live_cfg, 24, hookpoint="layers.1", seed=5)
    head = rows(source, 11)
    resumed = LiveSource(live_cfg, 24, hookpoint="layers.1", seed=5, prefetch=0)
    resumed.load_state_dict(source.state_dict())
    tail = rows(resumed, 19)
    assert len(head + tail) == 30 and all(torch.equal(a, b) for a, b in zip(head + tail, full))
    other = rows(LiveSource(live_cfg, 24, hookpoint="layers.1", seed=6), 30)
    assert not torch.equal(torch.cat(other), torch.cat(full))


def test_budget_transcoder_pairs_and_normalisation(live_cfg):
    cfg = LiveConfig(model=live_cfg.model, text=live_cfg.text, mixing_tokens=100, heldout_contexts=8,
                     harvest=HarvestConfig(batch_size=4, max_tokens=333, progress=False))
    source = LiveSource(cfg, 50, hookpoint="layers.0.mlp_in", target_hookpoint="layers.0.mlp", normalize="scale")
    batches = rows(source)
    assert sum(b.shape[0] for b in batches) == 333 and (source.d_in, source.d_out) == (32, 32)
    held = source.heldout_batches(10)
    x = torch.cat([b.x for b in held])
    assert x.norm(dim=1).mean().item() == pytest.approx(math.sqrt(32), rel=1e-5)  # stats come from held-out rows
    assert all(b.y is not None and b.y.shape == b.x.shape for b in held)
    with pytest.raises(ValueError, match="must each name one hook point"):
        LiveSource(cfg, 50, hookpoint="layers.*")
