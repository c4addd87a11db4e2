"""A buffer's manifest.json is read, never trusted: paths stay inside the buffer, keys have their types,
and a harvest never writes into a folder that is not a buffer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from sae.buffer.config import WriterConfig
from sae.buffer.manifest import MANIFEST, read_manifest
from sae.buffer.reader import ShardReader
from sae.buffer.writer import ShardWriter
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.harvester import Chunk
from sae.paths import UnsafePathError
from sae.runners.harvest import harvest_to_buffer


def fake_buffer(folder):
    """A complete buffer of 300 rows of hook point ``x`` (d=8) in three shards."""
    w = ShardWriter(folder, {"hookpoints": {"x": {"d": 8}}, "hookpoint_order": ["x"]}, 100, "float32")
    n = torch.arange(300)
    w.append(Chunk({"x": torch.randn(300, 8)}, n.int(), n.int(), n))
    w.finish()
    return folder


def edit_manifest(folder, edit):
    m = json.loads((folder / MANIFEST).read_text())
    edit(m)
    (folder / MANIFEST).write_text(json.dumps(m))


def tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def harvest(model, out, docs=None, overwrite=False):
    return harvest_to_buffer(ModelConfig(name=str(model), device="cpu"),
                             TextConfig(name=str(docs or "unused.jsonl"), context_length=16),
                             HarvestConfig(batch_size=4, max_tokens=100, progress=False),
                             WriterConfig(out_dir=str(out), shard_tokens=64, overwrite=overwrite), ["layers.1"])


def victim(tmp_path):
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "thesis.tex").write_text("years of work")
    return tmp_path / "victim"


@pytest.mark.parametrize("entry", ["../victim", "ABSOLUTE"], ids=["dotdot", "absolute"])
def test_overwrite_with_a_poisoned_hookpoint_order_touches_nothing(tiny_gpt2, tmp_path, entry):
    """The old overwrite ran ``rmtree(folder / hp)`` for every listed hook point, deleting ``victim``."""
    target = victim(tmp_path)
    entry = str(target) if entry == "ABSOLUTE" else entry
    buf = fake_buffer(tmp_path / "buf")
    edit_manifest(buf, lambda m: m["hookpoint_order"].append(entry))
    before = tree(buf)
    try:
        harvest(tiny_gpt2, buf, overwrite=True)
        error = None
    except Exception as e:  # noqa: BLE001 (checked below, after the victim)
        error = e
    assert (target / "thesis.tex").read_text() == "years of work"
    assert isinstance(error, UnsafePathError) and str(error).startswith(
        f"{buf / MANIFEST} hookpoint_order[1] is {entry!r}, which points outside {buf}; refusing to read, write or "
        "delete it")
    assert tree(buf) == before  # the buffer itself is left as it was, manifest included


@pytest.mark.parametrize("entry", ["../outside/shard_000000.safetensors", "ABSOLUTE"], ids=["dotdot", "absolute"])
def test_reader_refuses_a_shard_path_outside_the_buffer(tmp_path, entry):
    buf = fake_buffer(tmp_path / "buf")
    (tmp_path / "outside").mkdir()  # a readable copy: the old reader opened it without complaint
    shutil.copy(buf / "x" / "shard_000000.safetensors", tmp_path / "outside")
    entry = str(tmp_path / "outside" / "shard_000000.safetensors") if entry == "ABSOLUTE" else entry
    edit_manifest(buf, lambda m: m["shards"][0]["files"]["x"].update(path=entry))
    with pytest.raises(UnsafePathError, match=r"manifest\.json shards\[0\]\.files\.x\.path is '.*shard_000000"
                                              r"\.safetensors', which points outside"):
        ShardReader(buf, 32, heldout_shards=0)

    # The reader checks again where it opens a file, whoever handed it the manifest.
    fresh = fake_buffer(tmp_path / "fresh")
    reader = ShardReader(fresh, 32, heldout_shards=0, epochs=1)
    reader.manifest["shards"][2]["files"]["x"]["path"] = "../buf/x/shard_000002.safetensors"
    with pytest.raises(UnsafePathError, match=r"shards\[2\]\.files\.x\.path is '\.\./buf/x/shard_000002"):
        list(reader)


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.pop("hookpoints"), "'hookpoints' is missing"),
    (lambda m: m.update(hookpoint_order="x"), "'hookpoint_order' is \"x\", not a list"),
    (lambda m: m["shards"].__setitem__(1, "x/shard_000001.safetensors"),
     "'shards[1]' is \"x/shard_000001.safetensors\", not an object"),
    (lambda m: m["shards"][2]["files"]["x"].pop("path"), "'shards[2].files.x.path' is missing"),
    (lambda m: m["hookpoints"]["x"].update(d="8"), "'hookpoints.x.d' is \"8\", not an integer"),
    (lambda m: m.update(complete=1), "'complete' is 1, not true or false"),
    (lambda m: m.update(resume=[3, 4]), "'resume' is [3, 4], not an object"),
    (lambda m: m.update(hookpoint_order=["x", "x"]),
     "'hookpoint_order' ['x', 'x'] does not list the keys of 'hookpoints' ['x'] once each"),
], ids=["missing-key", "order-not-list", "shard-not-dict", "missing-path", "d-str", "complete-int", "resume-list",
        "order-twice"])
def test_a_damaged_manifest_names_the_file_the_key_and_the_fix(tmp_path, edit, problem):
    buf = fake_buffer(tmp_path / "buf")
    edit_manifest(buf, edit)
    expected = (f"{buf / MANIFEST}: {problem}; the buffer is damaged or was edited: restore manifest.json from a "
                f"copy, or delete {buf} and harvest it again")
    with pytest.raises(ValueError) as e:
        read_manifest(buf)
    assert str(e.value) == expected
    with pytest.raises(ValueError) as e:  # what training sees (before: KeyError / TypeError)
        ShardReader(buf, 32, heldout_shards=0)
    assert str(e.value) == expected


@pytest.mark.parametrize("files, names", [
    ({"config.json": "{}", "model.safetensors": "", "tokenizer.json": "{}"},
     "config.json, model.safetensors, tokenizer.json"),
    ({"run.json": "{}", "checkpoints/step_2/checkpoint.json": "{}"}, "checkpoints, run.json"),
    ({**{f"{c}.txt": "" for c in "abcde"}, "cli.log": ""}, "a.txt, b.txt, c.txt, d.txt, ..."),
], ids=["model-folder", "sae-run", "anything"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_harvest_refuses_a_folder_that_is_not_a_buffer(tiny_gpt2, tmp_path, files, names, overwrite):
    out = tmp_path / "other"
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = tree(out)
    with pytest.raises(ValueError) as e:
        harvest(tiny_gpt2, out, overwrite=overwrite)
    assert str(e.value) == (f"writer.out_dir={out} holds {names} and no manifest.json: it is not an activation "
                            "buffer, and harvesting would mix shards into it; pick an empty or new writer.out_dir")
    assert tree(out) == before and sorted(p.name for p in out.iterdir()) == sorted({n.split("/")[0] for n in files})


def test_harvest_accepts_what_an_unfinished_harvest_leaves(tiny_gpt2, tmp_path):
    """Hydra's job log, a temporary manifest and an orphan shard from a kill before the first
    manifest: the harvest starts afresh there (the orphan is replaced), as before."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Line {i} says something short."}) + "\n" for i in range(40)))
    out = tmp_path / "buf"
    (out / "layers.1").mkdir(parents=True)
    (out / "layers.1" / "shard_000000.safetensors").write_bytes(b"half a shard")
    (out / ".manifest.json.tmp").write_text("{")
    (out / "cli.log").write_text("")
    result = harvest(tiny_gpt2, out, docs)
    assert result.manifest["complete"] and result.manifest["tokens"] == 100 and not result.resumed
    reader = ShardReader(out, 10, heldout_shards=0, epochs=1, verify="open")
    assert sum(b.x.shape[0] for b in reader) == 100


def test_cli_reports_a_poisoned_manifest_in_one_line(tiny_gpt2, tmp_path):
    target = victim(tmp_path)
    buf = fake_buffer(tmp_path / "buf")
    edit_manifest(buf, lambda m: m["hookpoint_order"].append("../victim"))
    env = {**os.environ, "SAE_DEBUG": "0"}
    proc = subprocess.run([sys.executable, "-c", "from sae.runners.cli import harvest_main; harvest_main()",
                           f"model.name={tiny_gpt2}", "model.device=cpu", "hookpoints=[layers.1]",
                           "harvest.max_tokens=100", "harvest.progress=false",
                           f"writer.out_dir={buf}", "writer.overwrite=true"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"sae-harvest: error: {buf / MANIFEST} hookpoint_order[1] is '../victim', which points outside {buf}; "
        "refusing to read, write or delete it: restore the file or recreate the folder",
        "(UnsafePathError; set SAE_DEBUG=1 for the traceback)"]
    assert (target / "thesis.tex").read_text() == "years of work" and (buf / MANIFEST).is_file()
