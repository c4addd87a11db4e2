"""Hub upload and download up to the network boundary: ``sae-export --push-to-hub`` against a local fake Hub.

The client is configured through its documented endpoint setting (``HF_ENDPOINT``) in a
subprocess, as a user would, and every request it makes is recorded by ``fake_hub.FakeHub``.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from saes import activations, make_sae, outputs
from safetensors.torch import load_file

from sae.train.artifact import save_sae

SAE_EXPORT = str(Path(sys.executable).parent / "sae-export")
TOKEN = "hf_test_token_123"


def hub_env(tmp_path: Path, url: str, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"),
               HF_TOKEN_PATH=str(tmp_path / "hf_home" / "token"), HF_HUB_DISABLE_TELEMETRY="1")
    if token:
        env["HF_TOKEN"] = token
    return env


def trained_folder(tmp_path: Path) -> Path:
    """A final/<name> folder as training writes it, with a data section naming the hook point."""
    folder = tmp_path / "run" / "final" / "topk"
    save_sae(make_sae("topk"), folder, data={"source": "buffer", "hookpoint": "layers.1", "target_hookpoint": ""})
    return folder


def export_cli(tmp_path: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([SAE_EXPORT, str(tmp_path / "run" / "final" / "topk"), str(tmp_path / "out"),
                           "--format", "saelens", "--model-name", "EleutherAI/pythia-70m", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


def test_push_to_hub_creates_repo_branch_and_one_commit_then_reupload_is_a_no_op(tmp_path):
    trained_folder(tmp_path)
    with FakeHub() as hub:
        env = hub_env(tmp_path, hub.url)
        args = ("--push-to-hub", "me/pythia-saes", "--private", "--revision", "dev")
        first = export_cli(tmp_path, env, *args)
        assert first.returncode == 0, first.stderr
        second = export_cli(tmp_path, env, *args, "--overwrite")  # same checkpoint, same bytes
        assert second.returncode == 0, second.stderr
        created = hub.calls("POST", r"^/api/repos/create$")
        assert len(created) == 2 and created[0].body["name"] == "pythia-saes"
        assert created[0].body["organization"] == "me" and created[0].body["visibility"] == "private"
        assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests if r.method == "POST")
        assert [r.path for r in hub.calls("POST", "/branch/")] == ["/api/models/me/pythia-saes/branch/dev"] * 2
        cards = [r.body["content"] for r in hub.calls("POST", r"^/api/validate-yaml$")]
        assert cards and all("library_name: saelens" in c and "- EleutherAI/pythia-70m" in c for c in cards)
        pre = hub.calls("POST", r"/preupload/dev$")
        expected = {"README.md", "layers.1/README.md", "layers.1/cfg.json", "layers.1/sae_weights.safetensors"}
        assert len(pre) == 2 and {f["path"] for f in pre[0].body["files"]} == expected
        commits = hub.calls("POST", r"/commit/dev$")
        assert len(commits) == 1, "re-uploading an unchanged export must not commit"
        sent = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in commits[0].body
                if line["key"] == "file"}
        assert set(sent) == expected
        for path, data in sent.items():
            assert (tmp_path / "out" / path).read_bytes() == data
        repo = hub.repos["me/pythia-saes"]
        assert repo.private and repo.branches["main"] == "" and repo.files("dev") == sent
        assert "uploaded to me/pythia-saes" in first.stdout


def test_load_pretrained_downloads_a_hub_repo(tmp_path):
    sae = make_sae("jumprelu")
    save_sae(sae, tmp_path / "run" / "final" / "topk", data={"source": "buffer", "hookpoint": "layers.1"})
    with FakeHub() as hub:
        env = hub_env(tmp_path, hub.url)
        pushed = export_cli(tmp_path, env, "--push-to-hub", "me/saes")
        assert pushed.returncode == 0, pushed.stderr
        code = ("import sys; from safetensors.torch import save_file\n"
                "from sae.export import load_pretrained_with_info\n"
                "p = load_pretrained_with_info('me/saes', hookpoint='layers.1')\n"
                "print(p.format, p.hookpoint, p.model_name)\n"
                "save_file({k: v.contiguous() for k, v in p.sae.state_dict().items()}, sys.argv[1])")
        got = subprocess.run([sys.executable, "-c", code, str(tmp_path / "loaded.safetensors")], env=env,
                             capture_output=True, text=True, timeout=300)
        assert got.returncode == 0, got.stderr
        assert got.stdout.split() == ["saelens", "layers.1", "EleutherAI/pythia-70m"]
        assert hub.calls("GET", r"/resolve/.+/layers\.1/sae_weights\.safetensors$")
    from sae.models import SAEConfig, build_sae

    back = build_sae(SAEConfig(architecture="jumprelu", num_latents=sae.num_latents, k=sae.cfg.k), sae.d_in)
    back.load_state_dict(load_file(str(tmp_path / "loaded.safetensors")))
    x = activations()
    for a, b in zip(outputs(sae, x), outputs(back.eval(), x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stored_login", [False, True], ids=["no_token", "token_file"])
def test_missing_token_is_a_clear_error_before_any_request(tmp_path, stored_login):
    trained_folder(tmp_path)
    with FakeHub() as hub:
        env = hub_env(tmp_path, hub.url, token=None)
        if stored_login:  # the credential store `hf auth login` writes is honoured
            Path(env["HF_TOKEN_PATH"]).parent.mkdir(parents=True)
            Path(env["HF_TOKEN_PATH"]).write_text("hf_stored_token")
        done = export_cli(tmp_path, env, "--push-to-hub", "me/saes")
        posts = [r for r in hub.requests if r.method == "POST"]
    if stored_login:
        assert done.returncode == 0, done.stderr
        assert posts and all(r.authorization == "Bearer hf_stored_token" for r in posts)
    else:
        assert done.returncode != 0
        assert "no Hugging Face token" in done.stderr and "HF_TOKEN" in done.stderr and "hf auth login" in done.stderr
        assert "Traceback" not in done.stderr
        assert posts == [] and not (tmp_path / "out").exists()
