"""Interop with the real libraries: SAELens and sparsify load our exports, and we load what they save.

The libraries live in their own virtual environment (``bash launch/peers_env.sh`` creates
``.venv-peers``; ``launch/test.sh`` does so before the suite) because their pins may clash with
ours. One subprocess runs ``peer_check.py`` there for the whole module; the comparisons happen
here. Reference activations and our outputs travel as safetensors files.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from saes import D, K, L, activations, make_sae, outputs
from safetensors.torch import load_file, save_file

from sae.export import ExportItem, export_items, load_pretrained_with_info

pytestmark = pytest.mark.peers

ROOT = Path(__file__).resolve().parents[2]
# name -> (architecture, transcode, skip, d_out) of our SAEs exported for each library.
SAELENS_CASES = {"topk": ("topk", False, False, D), "jumprelu": ("jumprelu", False, False, D),
                 "batchtopk": ("batchtopk", False, False, D), "relu": ("relu", False, False, D),
                 "relu_skip_transcoder": ("relu", True, True, 10), "jumprelu_transcoder": ("jumprelu", True, False, 10),
                 "gated": ("gated", False, False, D), "matryoshka_topk": ("matryoshka_topk", False, False, D),
                 "matryoshka_batchtopk": ("matryoshka_batchtopk", False, False, D)}
SPARSIFY_CASES = {"topk": ("topk", False, False, D), "topk_skip_transcoder": ("topk", True, True, D)}
SAELENS_CLASS = {"topk": "TopKSAE", "jumprelu": "JumpReLUSAE", "batchtopk": "JumpReLUSAE", "relu": "StandardSAE",
                 "relu_skip_transcoder": "SkipTranscoder", "jumprelu_transcoder": "JumpReLUTranscoder",
                 "gated": "GatedSAE", "matryoshka_topk": "TopKSAE", "matryoshka_batchtopk": "JumpReLUSAE"}
# Models the libraries build and save with their own functions: (library, kind) -> our architecture.
SAVED = {("saelens", "topk"): "topk", ("saelens", "jumprelu"): "jumprelu", ("saelens", "standard"): "relu",
         ("saelens", "skip_transcoder"): "relu", ("saelens", "batchtopk_training"): "jumprelu",
         ("saelens", "gated"): "gated", ("saelens", "matryoshka_batchtopk_training"): "matryoshka_batchtopk",
         ("sparsify", "topk"): "topk", ("sparsify", "skip_transcoder"): "topk"}


def peers_python() -> Path:
    reason = os.environ.get("SAE_PEERS_UNAVAILABLE")
    if reason:
        pytest.skip(f"peer libraries unavailable: {reason}")
    py = Path(os.environ.get("SAE_PEERS_PYTHON") or ROOT / ".venv-peers" / "bin" / "python")
    if not py.is_file():
        pytest.skip(f"no peer environment at {py}: create it with `bash launch/peers_env.sh` (launch/test.sh does)")
    return py


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """Export ours, run peer_check.py once in .venv-peers, return (folder, report, our outputs)."""
    py = peers_python()
    tmp = tmp_path_factory.mktemp("peers")
    x = activations()
    job: dict[str, list] = {"load": [], "save": []}
    ours = {}
    for fmt, cases in (("saelens", SAELENS_CASES), ("sparsify", SPARSIFY_CASES)):
        items = []
        for name, (arch, transcode, skip, d_out) in cases.items():
            sae = make_sae(arch, transcode, skip, d_out)
            items.append(ExportItem(name, sae, hookpoint=name))
            ours[(fmt, name)] = outputs(sae, x)
            save_file({"x": x}, str(tmp / "x.safetensors"))
            job["load"].append({"lib": fmt, "folder": str(tmp / fmt / name), "ref": str(tmp / "x.safetensors"),
                                "out": str(tmp / f"got_{fmt}_{name}.safetensors")})
        export_items(items, tmp / fmt, fmt)  # one export per folder: a second one into it is refused
    job["load"] += [  # the Hub layout, through each library's own Hub loader
        {"lib": "saelens", "repo": "me/saelens-saes", "sae_id": "topk", "ref": str(tmp / "x.safetensors"),
         "out": str(tmp / "got_hub_saelens.safetensors")},
        {"lib": "sparsify", "repo": "me/sparsify-saes", "hookpoint": "topk", "ref": str(tmp / "x.safetensors"),
         "out": str(tmp / "got_hub_sparsify.safetensors")}]
    for i, (lib, kind) in enumerate(SAVED):
        d_out = 10 if (lib, kind) == ("saelens", "skip_transcoder") else D
        job["save"].append({"lib": lib, "kind": kind, "folder": str(tmp / "theirs" / f"{lib}_{kind}"),
                            "out": str(tmp / f"theirs_{lib}_{kind}.safetensors"), "d_in": D, "d_sae": L, "k": K,
                            "d_out": d_out, "seed": 10 + i})
    (tmp / "job.json").write_text(json.dumps(job))
    with FakeHub() as hub:
        hub.seed("me/saelens-saes", tmp / "saelens")
        hub.seed("me/sparsify-saes", tmp / "sparsify")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(SPARSIFY_DISABLE_TRITON="1", HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0",
                   HF_HOME=str(tmp / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
        done = subprocess.run([str(py), str(Path(__file__).with_name("peer_check.py")), str(tmp / "job.json")],
                              env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert done.returncode == 0, f"peer_check.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["versions"]["sae_lens"] and report["versions"]["sparsify"]
    return tmp, report, ours


def assert_same_outputs(got_codes, got_recon, codes, recon):
    """Same active latents, same values and reconstructions up to float32 matmul order."""
    assert (codes > 0).any() and (codes == 0).any()
    assert torch.equal(got_codes > 0, codes > 0), "different latents fire"
    torch.testing.assert_close(got_codes, codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_recon, recon, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SAELENS_CASES))
def test_saelens_loads_our_export_with_equal_outputs(peers, name):
    tmp, report, ours = peers
    i = list(SAELENS_CASES).index(name)
    assert report["load"][i]["class"] == SAELENS_CLASS[name]
    got = load_file(str(tmp / f"got_saelens_{name}.safetensors"))
    assert_same_outputs(got["codes"], got["recon"], *ours[("saelens", name)])


@pytest.mark.parametrize("name", list(SPARSIFY_CASES))
def test_sparsify_loads_our_export_with_equal_outputs(peers, name):
    tmp, report, ours = peers
    assert report["load"][len(SAELENS_CASES) + list(SPARSIFY_CASES).index(name)]["k"] == K
    got = load_file(str(tmp / f"got_sparsify_{name}.safetensors"))
    assert_same_outputs(got["codes"], got["recon"], *ours[("sparsify", name)])


@pytest.mark.parametrize("lib", ["saelens", "sparsify"])
def test_peers_load_our_export_from_the_hub(peers, lib):
    tmp, _, ours = peers
    got = load_file(str(tmp / f"got_hub_{lib}.safetensors"))
    assert_same_outputs(got["codes"], got["recon"], *ours[(lib, "topk")])


@pytest.mark.parametrize("lib,kind", list(SAVED))
def test_we_load_folders_saved_by_the_peers(peers, lib, kind):
    tmp, _, _ = peers
    loaded = load_pretrained_with_info(tmp / "theirs" / f"{lib}_{kind}")
    assert loaded.format == lib and loaded.sae.architecture == SAVED[(lib, kind)]
    assert loaded.sae.cfg.transcode == (kind == "skip_transcoder") and (loaded.sae.W_skip is not None) == (
        kind == "skip_transcoder")
    theirs = load_file(str(tmp / f"theirs_{lib}_{kind}.safetensors"))
    assert_same_outputs(*outputs(loaded.sae, theirs["x"]), theirs["codes"], theirs["recon"])


def test_saelens_matryoshka_training_folder_keeps_its_groups(peers):
    tmp, _, _ = peers
    loaded = load_pretrained_with_info(tmp / "theirs" / "saelens_matryoshka_batchtopk_training")
    assert loaded.sae.groups == [L // 4, L - L // 4]  # from matryoshka_widths [L/4, L]
