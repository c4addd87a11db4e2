"""A family is one module (issue 24): what the trainer, the latent-parallel strategy, the reshard
tool, the evaluator's runner and the export formats need from it is asked of the family, never of its
name.

Two families are registered here, as a user would add one, without touching any other module: a
cross-layer transcoder variant and a TopK variant. Both train latent-parallel, reshard, export to the
formats their plain forms map to and are refused by the others with the same fixes as the built-in
families. The latent-parallel forward and init of the built-in families are checked against one
process holding every latent through the same placement interface the strategy hands them.
"""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from sae.export import ExportItem, export_items, load_pretrained
from sae.export.saelens import saelens_architecture
from sae.export.sparsify import check_exportable as sparsify_check
from sae.models import SAEConfig, build_sae, registry
from sae.models.base import LocalLatents, Shard
from sae.models.clt import CrossLayerTranscoder
from sae.models.registry import register
from sae.models.topk import TopKSAE
from sae.train.sharded_latents import ShardedLatents


class CLTVariant(CrossLayerTranscoder):
    """A new cross-layer family (it would differ in its training loss; the interface is inherited)."""


class TopKVariant(TopKSAE):
    export_form = "topk"  # TopK at inference: exports map it as TopK


@pytest.fixture(autouse=True, scope="module")
def new_families():
    """Registered for this module's tests only (other tests list the built-in architectures)."""
    register("test_clt_variant")(CLTVariant)
    register("test_topk_variant")(TopKVariant)
    yield
    for name in ("test_clt_variant", "test_topk_variant"):
        registry._REGISTRY.pop(name)


def clt(architecture: str = "clt", activation: str = "jumprelu", seed: int = 0):
    cfg = SAEConfig(architecture=architecture, clt_layers=3, num_latents=16, k=3, clt_activation=activation,
                    transcode=True, batch_topk_cap=6)
    model = build_sae(cfg, 24, 24, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "log_threshold":
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return model


def whole(sae) -> ShardedLatents:
    """A one-rank latent-parallel placement: the strategy's code path, every latent on this rank."""
    return ShardedLatents(Shard(0, 1, 0, sae.num_latents), sae.b_dec.device)


def test_the_new_families_are_asked_not_named():
    variant, topk = clt("test_clt_variant"), build_sae(SAEConfig(architecture="test_topk_variant", k=4,
                                                                num_latents=32), 8)
    assert variant.cross_layer and variant.latent_parallel and variant.latent_groups == 3
    assert not topk.cross_layer and topk.latent_parallel and topk.latent_groups == 1
    assert saelens_architecture(topk) == "topk"
    sparsify_check(topk)
    with pytest.raises(ValueError, match="SAELens has no cross-layer transcoder.*circuit-tracer"):
        saelens_architecture(variant)
    with pytest.raises(ValueError, match="circuit-tracer"):
        sparsify_check(variant)
    shards = [variant.latent_shard(r, 2) for r in range(2)]
    assert all(s.latent_groups == 3 and s.latents_per_layer == 8 for s in shards)
    joined = variant.join_latent_shards(shards, variant.num_latents)
    assert all(torch.equal(a, b) for a, b in zip(joined.state_dict().values(), variant.state_dict().values()))


def test_a_new_cross_layer_family_exports_as_a_circuit_tracer_clt(tmp_path):
    variant = clt("test_clt_variant")
    export_items([ExportItem("clt", variant, {}, model_name="EleutherAI/pythia-70m")], tmp_path / "ct",
                 "circuit-tracer")
    folder = tmp_path / "ct"
    assert {"W_enc_0.safetensors", "W_dec_2.safetensors"} <= {p.name for p in folder.iterdir()}
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg["model_kind"] == "cross_layer_transcoder"
    assert cfg["sae_forge"]["layers"][0]["architecture"] == "test_clt_variant"
    back = load_pretrained(folder)  # circuit-tracer's files read back as a (plain) CLT
    assert back.cross_layer and torch.equal(back.W_enc, variant.W_enc)
    x = torch.randn(8, 24)
    torch.testing.assert_close(back(x, x).x_hat, variant(x, x).x_hat)


@pytest.mark.parametrize("arch", ["topk", "clt_topk", "clt_batchtopk", "clt_jumprelu"])
def test_the_latent_parallel_code_path_equals_one_process(arch):
    """Forward, AuxK and the data-dependent init through the strategy's placement (one rank holding
    every latent) equal the model's own single-process code."""
    torch.manual_seed(0)
    if arch == "topk":
        make = lambda: build_sae(SAEConfig(num_latents=64, k=4, k_aux=8), 16, seed=0)  # noqa: E731
        x, y = torch.randn(48, 16), None
    else:
        make = lambda: clt(activation=arch.removeprefix("clt_"))  # noqa: E731
        x, y = torch.randn(48, 24), torch.randn(48, 24)
    one, par = make(), make()
    one.init_from_data(x, y)
    par.init_from_data_with(whole(par), x, y)
    for (n, a), b in zip(one.state_dict().items(), par.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
    dead = torch.zeros(one.num_latents, dtype=torch.bool)
    dead[::3] = True
    out_one = one(x, y, dead_mask=dead)
    out_par = par.forward_with(whole(par), x, y, dead_mask=dead)
    torch.testing.assert_close(out_par.x_hat, out_one.x_hat, rtol=1e-5, atol=1e-5)
    assert out_one.losses.keys() == out_par.losses.keys() and ("auxk" in out_one.losses or arch == "clt_jumprelu")
    for k, v in out_one.losses.items():
        assert math.isclose(float(out_par.losses[k].detach()), float(v.detach()), rel_tol=1e-5, abs_tol=1e-6), k
    out_one.losses["loss"].backward()
    out_par.losses["loss"].backward()
    for (n, p), q in zip(one.named_parameters(), par.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_a_family_without_latent_parallelism_refuses_a_slice():
    relu = build_sae(SAEConfig(architecture="relu", num_latents=32), 8)
    x = torch.randn(4, 8)
    assert torch.equal(relu.forward_with(LocalLatents(), x).x_hat, relu(x).x_hat)
    with pytest.raises(NotImplementedError, match="'relu' does not split its latents"):
        relu.forward_with(whole(relu), x)
    with pytest.raises(NotImplementedError, match="'relu' does not split its latents"):
        relu.init_from_data_with(whole(relu), x)
