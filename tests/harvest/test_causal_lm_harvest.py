"""A causal LM built from a transformers config (random weights), saved to a folder and harvested
by path through the same sae-harvest code path, at residual, MLP and MLP-input hook points."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sae.harvest.config import TextConfig
from sae.harvest.text import iter_contexts, load_text_dataset
from sae.harvest.tiny import save_tiny_model
from sae.runners.config import compose_harvest_config
from sae.runners.harvest import harvest_to_buffer

# family -> (block list in the LM-head model, MLP module name inside a block)
BLOCKS = {"gpt2": ("transformer.h", "mlp"), "llama": ("model.layers", "mlp")}


@pytest.fixture(scope="module", params=sorted(BLOCKS))
def tiny(request, tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp(request.param) / "model", request.param, layers=3, hidden=48)
    return request.param, folder


def test_local_causal_lm_harvest_matches_plain_hooks(tiny, tmp_path):
    family, folder = tiny
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"Item {i}: the {i % 7}th way to iterate over a mapping."})
                              for i in range(120)) + "\n")
    run = compose_harvest_config([
        "model=local_causal_lm", f"model.name={folder}", "model.dtype=float32", "model.device=cpu",
        f"text.name={docs}", "text.context_length=32", "harvest.batch_size=8", "harvest.progress=false",
        "harvest.max_tokens=1500", f"writer.out_dir={tmp_path / 'buf'}", "writer.shard_tokens=512",
        "hookpoints=[layers.1,layers.1.mlp,layers.2.mlp_in]",
    ])
    result = harvest_to_buffer(run.model, run.text, run.harvest, run.writer, run.hookpoints)
    m = result.manifest
    assert m["complete"] and m["tokens"] == 1500 and [s["tokens"] for s in m["shards"]] == [512, 512, 476]
    assert m["model"]["path"] == str(folder) and m["hookpoint_order"] == ["layers.1", "layers.1.mlp", "layers.2.mlp_in"]
    assert all(m["hookpoints"][hp]["d"] == 48 for hp in m["hookpoint_order"])
    shards = {hp: [load_file(str(result.folder / s["files"][hp]["path"])) for s in m["shards"]]
              for hp in m["hookpoint_order"]}
    rows = {hp: torch.cat([s["activations"] for s in v]) for hp, v in shards.items()}
    ctx = torch.cat([s["contexts"] for s in shards["layers.1"]])
    pos = torch.cat([s["positions"] for s in shards["layers.1"]])
    ids = torch.cat([s["token_ids"] for s in shards["layers.1"]])
    for hp in ("layers.1.mlp", "layers.2.mlp_in"):  # every hook point's shard holds the same tokens
        assert torch.equal(torch.cat([s["contexts"] for s in shards[hp]]), ctx)

    # Reference: the LM-head class (a different loading path) with plain hooks, one context at a time.
    ref = AutoModelForCausalLM.from_pretrained(folder).eval()
    blocks_path, mlp = BLOCKS[family]
    blocks = ref.get_submodule(blocks_path)
    seen = {}
    hooks = [blocks[1].register_forward_hook(lambda m, a, o: seen.update(res=o[0] if isinstance(o, tuple) else o)),
             getattr(blocks[1], mlp).register_forward_hook(lambda m, a, o: seen.update(mlp=o)),
             getattr(blocks[2], mlp).register_forward_pre_hook(lambda m, a: seen.update(mlp_in=a[0]))]
    contexts = iter_contexts(load_text_dataset(TextConfig(name=str(docs))), result_tokenizer(folder),
                             TextConfig(name=str(docs), context_length=32))
    tok = result_tokenizer(folder)
    specials = {tok.bos_token_id, tok.eos_token_id}
    try:
        for c in contexts:
            if c.index > int(ctx.max()):
                break
            with torch.no_grad():
                ref(input_ids=torch.tensor([c.ids]))
            sel = ctx == c.index
            keep = [p for p, t in enumerate(c.ids) if t not in specials]  # drop_special drops BOS/EOS rows
            assert pos[sel].tolist() == keep[: int(sel.sum())]
            assert ids[sel].tolist() == [c.ids[p] for p in pos[sel].tolist()]
            p = pos[sel].long()
            torch.testing.assert_close(rows["layers.1"][sel], seen["res"][0, p], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(rows["layers.1.mlp"][sel], seen["mlp"][0, p], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(rows["layers.2.mlp_in"][sel], seen["mlp_in"][0, p], atol=1e-5, rtol=1e-4)
    finally:
        for h in hooks:
            h.remove()


def result_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_glob_harvest_of_every_residual_point(tiny, tmp_path):
    _, folder = tiny
    docs = tmp_path / "docs.txt"
    docs.write_text("A for loop walks any iterable, one item per pass.\n" * 60)
    run = compose_harvest_config([f"model.name={folder}", "model.device=cpu", "harvest.progress=false",
                                  f"text.name={docs}", "harvest.max_tokens=300", "text.context_length=64",
                                  f"writer.out_dir={tmp_path / 'buf'}",
                                  "writer.dtype=bfloat16", "hookpoints=[layers.*]"])
    m = harvest_to_buffer(run.model, run.text, run.harvest, run.writer, run.hookpoints).manifest
    assert m["hookpoint_order"] == ["layers.0", "layers.1", "layers.2"] and m["dtype"] == "bfloat16"
    acts = load_file(str(tmp_path / "buf" / m["shards"][0]["files"]["layers.2"]["path"]))["activations"]
    assert acts.dtype == torch.bfloat16 and acts.shape == (300, 48)


def test_model_loads_in_the_dtype_asked_for(tiny):
    from datasets import Dataset

    from sae.harvest.config import HarvestConfig, ModelConfig
    from sae.harvest.harvester import Harvester
    from sae.harvest.model import load_model

    _, folder = tiny
    lm = load_model(ModelConfig(name=str(folder), dtype="bfloat16", device="cpu"))
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16} and lm.info["dtype"] == "bfloat16"
    h = Harvester(lm, ["layers.0"], TextConfig(context_length=8), HarvestConfig(progress=False))
    (chunk,) = list(h.chunks(Dataset.from_dict({"text": ["dtype check for a tiny model"]})))
    assert chunk.acts["layers.0"].dtype == torch.bfloat16 and len(chunk) > 0
