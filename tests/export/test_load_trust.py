"""Loading trusts no cfg.json and no weight: sizes are checked against the safetensors header before
anything is allocated, non-finite weights are refused naming the tensor, in our format and the
peers' (SAELens ``d_sae``, sparsify ``num_latents``)."""

from __future__ import annotations

import json
import resource

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.export import export_items, load_pretrained
from sae.export.item import ExportItem
from sae.models import SAEConfig, build_sae
from sae.train.artifact import load_sae, save_sae


@pytest.fixture
def folder(tmp_path):
    return save_sae(build_sae(SAEConfig(num_latents=32, k=4), 8, seed=0), tmp_path / "sae")


def edit_cfg(path, **changes):
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("key, size", [("num_latents", 10**12), ("sae.num_latents", 10**12),
                                       ("sae.num_latents", 2 * 10**6)])
def test_an_absurd_size_is_refused_before_any_allocation(folder, key, size):
    """10**12 latents used to try 256 TB; 2e6 allocated 1.3 GB before the shape error."""
    load_pretrained(folder)  # imports and first-use buffers out of the peak-memory figure below
    edit_cfg(folder / "cfg.json", **{key: size})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"cfg.json") as err:
        load_pretrained(folder)
    assert str(size) in str(err.value) and "restore" in str(err.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000  # KiB: no allocation of that size


def test_sizes_that_disagree_with_the_weights_name_the_tensor(folder):
    edit_cfg(folder / "cfg.json", **{"num_latents": 64, "sae.num_latents": 64})
    with pytest.raises(ValueError, match=r"W_enc: \[64, 8\] from the config, \[32, 8\] in the file"):
        load_sae(folder)
    edit_cfg(folder / "cfg.json", **{"num_latents": 48, "sae.num_latents": 32})  # top level alone edited
    with pytest.raises(ValueError, match=r"num_latents is 48 but its 'sae' section makes an SAE with 32"):
        load_sae(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(folder, bad):
    path = folder / "sae.safetensors"
    state = load_file(str(path))
    state["W_dec"][3, 1] = bad
    save_file(state, str(path))
    kind = "1 NaN and 0 Inf" if bad != bad else "0 NaN and 1 Inf"
    with pytest.raises(ValueError, match=rf"tensor 'W_dec' holds {kind} of 256 values"):
        load_pretrained(folder)


def test_peer_formats_check_their_sizes_and_values(tmp_path):
    sae = build_sae(SAEConfig(num_latents=32, k=4), 8, seed=0)
    for fmt, key in (("saelens", "d_sae"), ("sparsify", "num_latents")):
        out = tmp_path / fmt
        export_items([ExportItem("h", sae, hookpoint="h")], out, fmt)
        edit_cfg(out / "h" / "cfg.json", **{key: 10**12})
        with pytest.raises(ValueError, match=rf"{key}=1000000000000.* in the file"):
            load_pretrained(out / "h")
    out = tmp_path / "nan"
    poisoned = build_sae(SAEConfig(num_latents=32, k=4), 8, seed=0)
    with torch.no_grad():
        poisoned.b_enc[0] = float("nan")
    export_items([ExportItem("h", poisoned, hookpoint="h")], out, "saelens")
    with pytest.raises(ValueError, match=r"saelens format\): tensor 'b_enc' holds 1 NaN"):
        load_pretrained(out / "h")
