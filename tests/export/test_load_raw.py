"""``load_pretrained`` on our own format gives an SAE for raw activations, like SAELens/sparsify imports.

An SAE trained on normalised activations (cfg.json ``normalization``: x' = (x - mu) * s) loads with
the map folded into its weights: same latents on raw x as the trained SAE on x', reconstruction in
raw space. ``raw_activations=False`` returns it as trained.
"""

from __future__ import annotations

import torch

from sae.export import load_pretrained, load_pretrained_with_info
from sae.models import SAEConfig, build_sae
from sae.train.artifact import save_sae


def test_ours_loads_for_raw_activations(tmp_path):
    g = torch.Generator().manual_seed(0)
    sae = build_sae(SAEConfig(num_latents=64, k=4), 16, seed=0)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(16, generator=g) * 0.1)
    mu, s = torch.randn(16, generator=g), 0.25
    save_sae(sae, tmp_path / "sae", normalization={"x": {"mode": "center_scale", "scale": s, "mean": mu.tolist()}})
    x_raw = torch.randn(32, 16, generator=g) * 4 + mu
    x_norm = (x_raw - mu) * s

    info = load_pretrained_with_info(tmp_path / "sae")
    assert info.folded
    trained, loaded = sae.encode(x_norm), info.sae.encode(x_raw)
    assert torch.equal(loaded.idx.sort(1).values, trained.idx.sort(1).values)
    torch.testing.assert_close(loaded.vals.sort(1).values, trained.vals.sort(1).values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(info.sae.decode(loaded), sae.decode(trained) / s + mu, rtol=1e-4, atol=1e-4)

    as_trained = load_pretrained(tmp_path / "sae", raw_activations=False)
    for name, p in sae.state_dict().items():
        assert torch.equal(as_trained.state_dict()[name], p), name
