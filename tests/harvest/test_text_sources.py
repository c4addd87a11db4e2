"""Text sources (built-in corpus, local files) and packing into contexts."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from sae.harvest.config import TextConfig
from sae.harvest.corpus import python_docs_dataset, python_docs_fingerprint
from sae.harvest.model import resolve_model_path
from sae.harvest.text import iter_contexts, load_text_dataset

ROWS = ["Lists are mutable sequences.", "Tuples are immutable sequences.", "", "Sets hold unique hashable items."]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))


def test_builtin_corpus_is_a_deterministic_dataset_of_python_prose():
    ds = python_docs_dataset()
    assert isinstance(ds, Dataset) and ds.column_names == ["text", "source"]
    assert len(ds) > 5000
    assert ds[0]["source"].startswith("pydoc:") and ds[len(ds) - 1]["source"].startswith("stdlib:")
    assert any("context manager" in t for t in ds[:200]["text"])
    again = python_docs_dataset()
    assert again["text"][:50] == ds["text"][:50] and python_docs_fingerprint() == python_docs_fingerprint()
    assert load_text_dataset(TextConfig())["text"][:5] == ds["text"][:5]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet"])
def test_local_files_load_through_datasets(tmp_path, suffix):
    path = tmp_path / f"docs{suffix}"
    rows = [r for r in ROWS if r]
    if suffix == ".txt":
        path.write_text("\n".join(rows) + "\n")
    elif suffix == ".parquet":
        Dataset.from_dict({"text": rows}).to_parquet(str(path))
    else:
        path.write_text("\n".join(json.dumps({"text": r, "id": i}) for i, r in enumerate(rows)) + "\n")
    ds = load_text_dataset(TextConfig(name=str(path)))
    assert ds["text"] == rows
    assert load_text_dataset(TextConfig(name="unused", data_files=[str(path)]))["text"] == rows
    folder = load_text_dataset(TextConfig(name=str(tmp_path)))
    assert folder["text"] == rows


def test_missing_column_and_empty_dataset_are_clear_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'text'; columns: \['body'\]"):
        load_text_dataset(TextConfig(name=str(path)))
    assert load_text_dataset(TextConfig(name=str(path), column="body"))["body"] == ["hello"]
    empty = tmp_path / "empty" / "docs.parquet"
    empty.parent.mkdir()
    Dataset.from_dict({"text": []}).to_parquet(str(empty))
    with pytest.raises(ValueError, match="are empty; point text.name at files with rows"):
        load_text_dataset(TextConfig(name=str(empty)))
    with pytest.raises(ValueError, match="built-in corpus is 'builtin:python-docs'"):
        load_text_dataset(TextConfig(name="builtin:nope"))


def test_packing_fills_contexts_in_order(tokenizer):
    ds = Dataset.from_dict({"text": ROWS * 20})
    cfg = TextConfig(context_length=16)
    contexts = list(iter_contexts(ds, tokenizer, cfg))
    assert [c.index for c in contexts] == list(range(len(contexts)))
    assert all(len(c.ids) == 16 for c in contexts[:-1]) and 1 < len(contexts[-1].ids) <= 16
    assert all(c.ids[0] == tokenizer.cls_token_id for c in contexts)
    body = [t for c in contexts for t in c.ids[1:]]
    expected = [t for r in ROWS * 20 if r for t in tokenizer(r, add_special_tokens=False)["input_ids"] + [102]]
    assert body == expected  # every token once, in order, documents separated by [SEP]
    no_bos = list(iter_contexts(ds, tokenizer, TextConfig(context_length=16, prepend_bos=False)))
    assert [t for c in no_bos for t in c.ids] == expected


def test_unpacked_contexts_truncate_each_document(tokenizer):
    ds = Dataset.from_dict({"text": ROWS})
    contexts = list(iter_contexts(ds, tokenizer, TextConfig(context_length=5, pack=False)))
    assert len(contexts) == 3  # the empty document is skipped
    for c, r in zip(contexts, [r for r in ROWS if r]):
        assert c.ids == [tokenizer.cls_token_id] + tokenizer(r, add_special_tokens=False)["input_ids"][:4]


def test_hub_names_go_to_load_dataset_with_config_split_and_revision(monkeypatch, tokenizer):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        ds = Dataset.from_dict({"text": ROWS})
        return ds.to_iterable_dataset() if kwargs.get("streaming") else ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = TextConfig(name="org/corpus", config_name="en", split="validation", revision="v2", streaming=True,
                     context_length=8)
    ds = load_text_dataset(cfg)
    assert calls == [(("org/corpus", "en"), {"split": "validation", "revision": "v2", "streaming": True})]
    assert [c.ids for c in iter_contexts(ds, tokenizer, cfg)] == [
        c.ids for c in iter_contexts(Dataset.from_dict({"text": ROWS}), tokenizer, cfg)]
    with pytest.raises(ValueError, match="has no column 'body'"):
        load_text_dataset(TextConfig(name="org/corpus", column="body", streaming=True))
