"""Export -> import round trips: same weights, same codes, same reconstructions, every architecture and format."""

from __future__ import annotations

import json

import pytest
import torch
from saes import CASES, D, activations, effective_threshold, make_sae, outputs

from sae.export import ExportItem, detect_format, export_items, load_pretrained
from sae.export.fold import fold_normalization
from sae.models import SparseCoder

# Formats that represent each case (the others must refuse it with a clear error).
SAELENS_OK = {c[0] for c in CASES} - {"topk_transcoder", "topk_skip_transcoder", "gated_transcoder"}
SPARSIFY_OK = {"topk", "topk_transcoder", "topk_skip_transcoder", "matryoshka_topk"}
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip")


def supported(fmt: str, case: str) -> bool:
    return fmt == "ours" or (fmt == "saelens" and case in SAELENS_OK) or (fmt == "sparsify" and case in SPARSIFY_OK)


def roundtrip(sae: SparseCoder, tmp_path, fmt: str, meta: dict | None = None) -> SparseCoder:
    item = ExportItem("mysae", sae, meta or {}, hookpoint="layers.1", model_name="tiny-model", tokens=1234, steps=5)
    result = export_items([item], tmp_path / fmt, fmt)
    folder = result.folders["mysae"]
    assert folder == tmp_path / fmt / "layers.1"
    assert detect_format(folder) == fmt
    return load_pretrained(folder)


@pytest.mark.parametrize("fmt", ["ours", "saelens", "sparsify"])
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_roundtrip_same_weights_and_outputs(tmp_path, fmt, case):
    _, arch, transcode, skip, d_out = next(c for c in CASES if c[0] == case)
    sae = make_sae(arch, transcode, skip, d_out)
    if not supported(fmt, case):
        with pytest.raises(ValueError, match="--format"):
            roundtrip(sae, tmp_path, fmt)
        return
    back = roundtrip(sae, tmp_path, fmt)
    assert (back.d_in, back.d_out, back.num_latents) == (sae.d_in, sae.d_out, sae.num_latents)
    assert back.cfg.transcode == sae.cfg.transcode and (back.W_skip is None) == (sae.W_skip is None)
    ours, theirs = sae.state_dict(), back.state_dict()
    for name in (*PARAMS, "b_mag", "r_mag"):
        if name in ours:
            assert torch.equal(ours[name], theirs[name]), f"{name} changed"
    if fmt == "ours" or (fmt == "saelens" and arch not in ("batchtopk", "matryoshka_batchtopk")):
        assert back.architecture == arch and back.cfg.k == sae.cfg.k
    thr = effective_threshold(sae)
    if thr is not None:  # SAELens stores exp(log_threshold); BatchTopK's scalar becomes a JumpReLU threshold
        torch.testing.assert_close(effective_threshold(back), thr, rtol=1e-6, atol=0)
    if fmt == "ours":
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert back.cfg == sae.cfg
    x = activations()
    codes, recon = outputs(sae, x)
    codes2, recon2 = outputs(back, x)
    assert (codes > 0).sum() > 0 and (codes == 0).sum() > 0  # the codes are sparse and not empty
    assert torch.equal(codes2, codes)
    if back.architecture == sae.architecture:
        assert torch.equal(recon2, recon)
    else:  # BatchTopK decodes sparsely, its JumpReLU import densely: same sum, other order
        torch.testing.assert_close(recon2, recon, rtol=1e-5, atol=1e-6)


def test_jumprelu_training_state_survives_saelens_roundtrip(tmp_path):
    sae = make_sae("jumprelu")
    back = roundtrip(sae, tmp_path, "saelens")
    assert float(back.act_scale) == pytest.approx(1.7)  # restored from metadata.sae_forge
    assert back.cfg.l0_coefficient == sae.cfg.l0_coefficient and back.cfg.k == sae.cfg.k


NORMALIZATION = {
    "scale": {"x": {"mode": "scale", "scale": 0.37, "mean": None}},
    "center_scale": {"x": {"mode": "center_scale", "scale": 2.5, "mean": [0.1 * i - 0.4 for i in range(D)]}},
}


def normalize(x: torch.Tensor, entry: dict) -> torch.Tensor:
    mean = torch.tensor(entry["mean"]) if entry.get("mean") is not None else 0.0
    return (x - mean) * entry["scale"]


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
@pytest.mark.parametrize("mode", ["scale", "center_scale"])
def test_peer_formats_fold_the_training_normalisation(tmp_path, fmt, mode):
    """The export works on raw activations: same codes, reconstruction = ours mapped back to raw space."""
    sae = make_sae("topk")
    norm = NORMALIZATION[mode]
    back = roundtrip(sae, tmp_path, fmt, {"normalization": norm})
    x = 3.0 * activations() + 1.0
    codes, recon_norm = outputs(sae, normalize(x, norm["x"]))
    codes2, recon_raw = outputs(back, x)
    torch.testing.assert_close(codes2, codes, rtol=1e-4, atol=1e-4)
    mean = torch.tensor(norm["x"]["mean"]) if norm["x"]["mean"] is not None else 0.0
    torch.testing.assert_close(recon_raw, recon_norm / norm["x"]["scale"] + mean, rtol=1e-4, atol=1e-4)
    cfg = json.loads((tmp_path / fmt / "layers.1" / "cfg.json").read_text())
    assert cfg.get("normalize_activations", "none") == "none"


@pytest.mark.parametrize("arch,skip", [("relu", True), ("jumprelu", False), ("gated", False), ("gated", True)])
def test_transcoder_fold_maps_both_hook_points(arch, skip):
    sae = make_sae(arch, True, skip, 10)
    norm = {"x": {"mode": "center_scale", "scale": 0.8, "mean": [0.05 * i for i in range(D)]},
            "y": {"mode": "center_scale", "scale": 1.9, "mean": [-0.2 + 0.03 * i for i in range(10)]}}
    folded = fold_normalization(sae, norm)
    x = activations() * 2 + 0.5
    codes, recon_norm = outputs(sae, normalize(x, norm["x"]))
    codes2, recon_raw = outputs(folded, x)
    torch.testing.assert_close(codes2, codes, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(recon_raw, recon_norm / 1.9 + torch.tensor(norm["y"]["mean"]), rtol=1e-4, atol=1e-4)


def test_unestimated_batchtopk_threshold_is_refused(tmp_path):
    sae = make_sae("batchtopk")
    sae.threshold.fill_(-1.0)
    with pytest.raises(ValueError, match="train it for at least one step"):
        roundtrip(sae, tmp_path, "saelens")


def test_several_saes_in_a_folder_need_a_hookpoint(tmp_path):
    items = [ExportItem(n, make_sae("topk", seed=i), hookpoint="layers.2") for i, n in enumerate(["k4", "k4b"])]
    export_items(items, tmp_path / "out", "sparsify")
    assert sorted(p.name for p in (tmp_path / "out" / "layers.2").iterdir()) == ["k4", "k4b"]
    assert "`layers.2/k4b`" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(ValueError, match="choose one with hookpoint="):
        load_pretrained(tmp_path / "out")
    back = load_pretrained(tmp_path / "out", hookpoint="layers.2/k4b")
    assert torch.equal(back.W_enc, items[1].sae.W_enc)


@pytest.mark.parametrize("fmt", ["ours", "saelens", "sparsify"])
def test_bfloat16_export_loads_back_as_rounded_float32(tmp_path, fmt):
    sae = make_sae("topk")
    result = export_items([ExportItem("s", sae, hookpoint="layers.0")], tmp_path / fmt, fmt, dtype="bfloat16")
    back = load_pretrained(result.folders["s"])
    assert back.W_enc.dtype == torch.float32
    assert torch.equal(back.W_enc, sae.W_enc.detach().bfloat16().float())
    assert not torch.equal(back.W_enc, sae.W_enc.detach())  # the rounding happened
