"""Nothing in an SAE folder makes the project run code or read the environment.

A crafted SAE folder whose cfg.json trains "live" on a model folder with custom code
(``auto_map`` + a Python file that leaves a marker when imported) and sets
``trust_remote_code: true``: ``sae-eval`` must not import that code (the marker stays absent);
only the user's own ``eval.trust_remote_code=true`` lets it run (the positive control, which shows
the marker would appear). ``${oc.env:...}`` in cfg.json stays text. ``sae-export --format ours``
strips ``trust_remote_code`` from what it writes.
"""

from __future__ import annotations

import json

import pytest

from sae.eval.config import EvalConfig
from sae.export import export_checkpoint
from sae.models import SAEConfig, build_sae
from sae.runners.evaluate import run_eval
from sae.train.artifact import save_sae

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PretrainedConfig


class EvilConfig(PretrainedConfig):
    model_type = "evilcfg"
"""


def crafted(tmp_path, data: dict):
    folder = tmp_path / "sae"
    save_sae(build_sae(SAEConfig(num_latents=64, k=4), 16, seed=0), folder, data=data)
    return folder


@pytest.fixture
def evil_model(tmp_path):
    model = tmp_path / "evil_model"
    model.mkdir()
    marker = tmp_path / "code_ran"
    (model / "config.json").write_text(json.dumps({"model_type": "evilcfg", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilConfig"}}))
    (model / "evil.py").write_text(EVIL.format(marker=str(marker)))
    return model, marker


def live_data(model) -> dict:
    return {"source": "live", "hookpoint": "layers.0",
            "live": {"model": {"name": str(model), "trust_remote_code": True}}}


def test_eval_does_not_run_code_named_by_cfg_json(tmp_path, evil_model):
    model, marker = evil_model
    folder = crafted(tmp_path, live_data(model))
    with pytest.raises(Exception):  # noqa: B017 (the model cannot load without its code: any error will do)
        run_eval(EvalConfig(sae_path=str(folder), device="cpu", plots=False, html=False))
    assert not marker.exists(), "sae-eval imported code from a model folder named in cfg.json"
    # Positive control: the user's own setting does let it run, so the check above could fail.
    with pytest.raises(Exception):  # noqa: B017
        run_eval(EvalConfig(sae_path=str(folder), device="cpu", plots=False, html=False, trust_remote_code=True))
    assert marker.read_text() == "ran"


def test_cfg_json_strings_are_not_interpolated(tmp_path, monkeypatch):
    secret = tmp_path / "secret_place"
    monkeypatch.setenv("SAE_TEST_SECRET", str(secret))
    folder = crafted(tmp_path, {"source": "buffer", "buffer": {"path": "${oc.env:SAE_TEST_SECRET}"}})
    with pytest.raises(FileNotFoundError) as e:
        run_eval(EvalConfig(sae_path=str(folder), device="cpu", plots=False, html=False))
    assert "${oc.env:SAE_TEST_SECRET}" in str(e.value) and str(secret) not in str(e.value)


def test_export_strips_code_settings(tmp_path, evil_model):
    model, _ = evil_model
    folder = crafted(tmp_path, live_data(model))
    assert "trust_remote_code" in (folder / "cfg.json").read_text()
    result = export_checkpoint(folder, tmp_path / "export", "ours", hookpoint="layers.0")
    (out,) = result.folders.values()
    text = (out / "cfg.json").read_text()
    assert "trust_remote_code" not in text and json.loads(text)["data"]["live"]["model"]["name"] == str(model)
