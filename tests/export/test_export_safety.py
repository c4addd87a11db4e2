"""Export never writes over what is in its output folder, keeps no code settings, refuses what a format
cannot hold before writing, reports an unwritable folder in one line, and writes files the umask allows."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from saes import D, make_sae
from test_circuit_tracer import clt_item, layer_items, make_clt

from sae.export import ExportItem, export_checkpoint, export_items, load_pretrained
from sae.export import export as export_mod
from sae.runners.export import main as export_main
from sae.train.artifact import save_sae


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(parent: Path) -> list[str]:
    """Hidden leftovers (temporary or replaced export folders) beside the output."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def trained(tmp_path: Path, **extra) -> Path:
    folder = tmp_path / "run" / "final" / "topk"
    save_sae(make_sae("topk"), folder, data={"source": "buffer", "hookpoint": "layers.0"}, **extra)
    return folder


def item(name: str = "s") -> ExportItem:
    return ExportItem(name, make_sae("topk"), hookpoint="layers.0", model_name="m")


# --- 1. the output folder ----------------------------------------------------------------------------------
def test_cli_refuses_a_non_empty_output_and_leaves_it_as_it_was(tmp_path):
    src = trained(tmp_path)
    out = tmp_path / "ex"
    (out / "layers.0").mkdir(parents=True)
    (out / "README.md").write_text("notes")
    with pytest.raises(SystemExit) as err:
        export_main([str(src), str(out)])
    msg = str(err.value)
    assert msg == (f"sae-export: error: the output folder {out} is not empty; pass --overwrite (overwrite=True) to "
                   "replace its contents, or export to a new folder")
    assert snapshot(out) == {"README.md": b"notes"} and hidden(tmp_path) == []

    fresh = tmp_path / "ex2"
    export_main([str(src), str(fresh)])
    first = snapshot(fresh)
    with pytest.raises(SystemExit, match="ex2 is not empty; pass --overwrite"):
        export_main([str(src), str(fresh), "--format", "ours"])
    assert snapshot(fresh) == first  # the saelens export is untouched: no second format mixed in


def test_api_refuses_a_non_empty_output_but_takes_an_empty_one(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"full is not empty; pass --overwrite \(overwrite=True\)"):
        export_items([item()], tmp_path / "full", "sparsify")
    assert snapshot(tmp_path / "full") == {"mine.txt": b"keep"}
    (tmp_path / "empty").mkdir()
    result = export_items([item()], tmp_path / "empty", "sparsify")
    assert sorted(snapshot(tmp_path / "empty")) == ["README.md", "layers.0/README.md", "layers.0/cfg.json",
                                                    "layers.0/sae.safetensors"]
    assert result.folders == {"s": tmp_path / "empty" / "layers.0"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        export_items([item()], tmp_path / "file", "sparsify", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"


def test_overwrite_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "ex"
    export_items([item()], out, "saelens")
    (out / "notes.txt").write_text("mine")
    result = export_checkpoint(trained(tmp_path), out, "ours", overwrite=True)
    assert sorted(snapshot(out)) == ["README.md", "layers.0/README.md", "layers.0/cfg.json", "layers.0/sae.safetensors"]
    assert "library_name: sae-forge" in (out / "README.md").read_text()
    assert result.folders == {"topk": out / "layers.0"} and load_pretrained(out / "layers.0").num_latents == 48
    assert hidden(tmp_path) == []


def test_a_failed_export_keeps_the_old_folder_and_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "ex"
    export_items([item("a"), ExportItem("b", make_sae("topk", seed=1), hookpoint="layers.1")], out, "saelens")
    before = snapshot(out)
    calls = []

    def fail_second(entry_item, folder, dtype):  # the first SAE is written, then the disk "fills up"
        calls.append(entry_item.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return writer(entry_item, folder, dtype)

    writer = export_mod.WRITERS["sparsify"]
    monkeypatch.setitem(export_mod.WRITERS, "sparsify", fail_second)
    with pytest.raises(OSError, match="No space left"):
        export_items([item("a"), ExportItem("b", make_sae("topk", seed=1), hookpoint="layers.1")], out, "sparsify",
                     overwrite=True)
    assert calls == ["a", "b"] and snapshot(out) == before and hidden(tmp_path) == []

    real_rename = os.rename

    def rename_in_fails(a, b):  # the old folder is already aside when the new one cannot come in
        if Path(a).name.startswith(".ex.export-"):
            raise OSError(5, "Input/output error")
        real_rename(a, b)

    monkeypatch.setattr(export_mod.os, "rename", rename_in_fails)
    with pytest.raises(OSError, match="Input/output error"):
        export_items([item()], out, "ours", overwrite=True)
    assert snapshot(out) == before and hidden(tmp_path) == []


@pytest.mark.parametrize("out", ["src", "src/export"])
def test_overwrite_never_exports_into_the_source(tmp_path, out):
    src = trained(tmp_path)
    before = snapshot(tmp_path / "run")
    with pytest.raises(ValueError, match="export to a folder outside it"):
        export_checkpoint(src, src if out == "src" else src / "export", "ours", overwrite=True)
    assert snapshot(tmp_path / "run") == before


def test_circuit_tracer_overwrite_drops_stale_layers_and_records_the_final_name(tmp_path):
    export_items(layer_items(n=3), tmp_path / "ct", "circuit-tracer")
    with pytest.raises(ValueError, match="not empty"):
        export_items(layer_items(n=2), tmp_path / "ct", "circuit-tracer")
    export_items(layer_items(n=2), tmp_path / "ct", "circuit-tracer", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == ["README.md", "config.yaml", "layer_0.safetensors",
                                                                   "layer_1.safetensors"]
    assert yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())["scan"] == "sae-forge/ct"


# --- 2. no code settings -----------------------------------------------------------------------------------
def test_ours_export_drops_trust_remote_code_at_every_depth(tmp_path):
    src = trained(tmp_path, trust_remote_code=True, extra={"model": {"trust_remote_code": True, "name": "m"}})
    assert (src / "cfg.json").read_text().count("trust_remote_code") == 2
    result = export_checkpoint(src, tmp_path / "out", "ours")
    text = (result.folders["topk"] / "cfg.json").read_text()
    assert "trust_remote_code" not in text and json.loads(text)["extra"] == {"model": {"name": "m"}}


# --- 3. what a format cannot hold --------------------------------------------------------------------------
def test_clt_saelens_is_refused_naming_the_formats_that_hold_it(tmp_path):
    with pytest.raises(ValueError, match=r"SAELens has no cross-layer transcoder; export this one with --format "
                                         r"circuit-tracer .* or --format ours"):
        export_items([clt_item(make_clt())], tmp_path / "lens", "saelens")
    with pytest.raises(ValueError) as err:
        export_items([clt_item(make_clt())], tmp_path / "sp", "sparsify")
    assert str(err.value) == ("sparsify loads TopK sparse coders only, not 'clt'; use --format circuit-tracer or "
                              "--format ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no hidden leftover
    for fmt in ("circuit-tracer", "ours"):  # the formats named do hold it
        (folder,) = export_items([clt_item(make_clt())], tmp_path / fmt, fmt).folders.values()
        assert load_pretrained(folder).architecture == "clt"


def test_cli_clt_saelens_refusal_is_one_line_and_writes_nothing(tmp_path):
    rec = {"layers": [0, 1, 2], "d_model": 8, "inputs": [f"layers.{i}.mlp_in" for i in range(3)],
           "targets": [f"layers.{i}.mlp" for i in range(3)]}
    save_sae(make_clt(), tmp_path / "run" / "final" / "clt", data={"source": "buffer", "normalize": "none"}, clt=rec)
    with pytest.raises(SystemExit) as err:
        export_main([str(tmp_path / "run"), str(tmp_path / "out"), "--format", "saelens"])
    assert str(err.value).startswith("sae-export: error: SAELens has no cross-layer transcoder") and "\n" not in str(
        err.value)
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


def test_sparsify_refusal_suggests_saelens_only_where_saelens_holds_it(tmp_path):
    with pytest.raises(ValueError, match=r"not 'gated'; use --format saelens \(ReLU, JumpReLU, BatchTopK, Gated\) or "):
        export_items([ExportItem("g", make_sae("gated"), hookpoint="x")], tmp_path / "a", "sparsify")
    export_items([ExportItem("g", make_sae("gated"), hookpoint="x")], tmp_path / "b", "saelens")  # it does
    with pytest.raises(ValueError) as err:
        export_items([ExportItem("g", make_sae("gated", True, False, 10), hookpoint="x")], tmp_path / "c", "sparsify")
    assert str(err.value).endswith("not 'gated'; use --format ours")
    with pytest.raises(ValueError, match="SAELens has no gated transcoder"):  # and indeed it does not
        export_items([ExportItem("g", make_sae("gated", True, False, 10), hookpoint="x")], tmp_path / "d", "saelens")


# --- 4. an unwritable output -------------------------------------------------------------------------------
def test_cli_unwritable_parent_is_one_line_naming_the_folder_and_the_fix(tmp_path, monkeypatch):
    src = trained(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: refuse as the kernel would for anyone else
        real_mkdir = os.mkdir

        def mkdir(path, mode=0o777, **kw):
            if Path(path).parent == locked:
                raise PermissionError(13, "Permission denied", str(path))
            real_mkdir(path, mode, **kw)

        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        with pytest.raises(SystemExit) as err:
            export_main([str(src), str(locked / "out")])
    finally:
        locked.chmod(0o755)
    assert str(err.value) == (f"sae-export: error: cannot create the export folder {locked / 'out'}: no permission "
                              f"to write in {locked}; write the export to a folder you can write to")
    assert list(locked.iterdir()) == []


# --- 5. file modes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
                         ids=["umask022", "umask077"])
def test_exported_files_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    sae = make_sae("jumprelu", True, False, D)
    old = os.umask(umask)
    try:
        save_sae(make_sae("topk"), tmp_path / "art")
        for fmt in ("ours", "saelens", "sparsify"):
            arch = "topk" if fmt == "sparsify" else "jumprelu"
            export_items([ExportItem("s", make_sae(arch), hookpoint="layers.0", frequencies=None if fmt != "saelens"
                                     else sae.b_enc.detach().abs())], tmp_path / fmt, fmt)
        export_items(layer_items(n=2), tmp_path / "ct", "circuit-tracer")
    finally:
        os.umask(old)
    assert oct(stat.S_IMODE((tmp_path / "art" / "sae.safetensors").stat().st_mode)) == oct(file_mode)
    files = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    assert "saelens/layers.0/sparsity.safetensors" in files and "ct/layer_1.safetensors" in files
    assert "ours/layers.0/sae.safetensors" in files and "sparsify/layers.0/sae.safetensors" in files
    want = {k: dir_mode if (tmp_path / k).is_dir() else file_mode for k in files}
    assert {k: oct(v) for k, v in files.items()} == {k: oct(v) for k, v in want.items()}
