"""Transcoders train with the defaults (issue: "Transcoders that train out of the box").

On a random tiny GPT-2, layer 0's MLP input -> MLP output: the target is ~100x smaller than the
input. With random unit-norm decoder rows a TopK transcoder used to end at FVU ~480 (output norm 19x
the target's) and a BatchTopK one at 99% dead latents; the TopK family now starts its decoder at zero,
free of the unit-norm constraint, with centred pre-activations (sparsify's transcoder init), and
BatchTopK's inference threshold tracks the final weights. The penalised families (ReLU, JumpReLU,
Gated) steer their coefficient to L0 = sae.k, and ReLU and Gated revive silenced latents with ghost
grads. Each family must come within 2x of the ReLU transcoder's FVU at the ReLU's L0, with at most 5%
dead latents, skip transcoders included; a CLT over both layers too, TopK (94% dead latents from
random unit rows), BatchTopK and JumpReLU (92% dead on raw rows: it trains per-layer normalised).

Dead = never fired on 4096 held-out tokens (16 batches): on 1024, a live latent that fires on one
token in 300 is counted dead 3% of the time.
"""

from __future__ import annotations

import pytest

from sae.runners.config import compose_harvest_config, compose_train_config
from sae.runners.harvest import harvest_to_buffer
from sae.runners.train import run_training

TOPK_FAMILY = ["topk", "batchtopk", "matryoshka_topk", "matryoshka_batchtopk"]
HELDOUT_BATCHES = 16  # of 256 tokens


@pytest.fixture(scope="module")
def mlp_buffer(tiny_gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp") / "buf"
    h = compose_harvest_config([f"model.name={tiny_gpt2}", "text.context_length=64", "harvest.progress=false",
                                "harvest.max_tokens=24576", f"writer.out_dir={out}", "writer.shard_tokens=8192",
                                "hookpoints=[layers.*.mlp_in,layers.*.mlp]"])
    harvest_to_buffer(h.model, h.text, h.harvest, h.writer, h.hookpoints)
    return out


def train(buffer, out, *extra):
    return run_training(compose_train_config([
        "data=buffer", f"data.buffer.path={buffer}", "data.hookpoint=layers.0.mlp_in",
        "data.target_hookpoint=layers.0.mlp", "sae.transcode=true", "sae.expansion_factor=16", "train=smoke",
        "train.steps=300", "train.batch_size=256", "train.progress=false", "train.eval_every=0",
        f"train.out_dir={out}", *extra]), heldout=HELDOUT_BATCHES).eval_metrics


@pytest.mark.slow
def test_every_topk_family_transcoder_trains_with_the_defaults(relu, mlp_buffer, tmp_path):
    fvu_relu, l0_relu = relu["fvu"], relu["l0"]
    k = max(4, round(l0_relu))
    variants = ", ".join([f"{a}: {{architecture: {a}}}" for a in TOPK_FAMILY[1:]]
                         + ["topk_skip: {skip_connection: true}"])
    got = train(mlp_buffer, tmp_path / "topk", "sae=topk", f"sae.k={k}", f"+variants={{{variants}}}")
    rows = {name: (got[name]["fvu"], got[name]["l0"], got[name]["dead_fraction"])
            for name in [*TOPK_FAMILY, "topk_skip"]}
    print(f"relu: fvu={fvu_relu:.4f} l0={l0_relu:.1f}; k={k}: "
          + "; ".join(f"{n}: fvu={f:.4f} l0={l0:.1f} dead={d:.1%}" for n, (f, l0, d) in rows.items()))
    for name, (fvu, l0, dead) in rows.items():
        assert fvu <= 2 * fvu_relu, (name, fvu, fvu_relu)
        assert dead <= 0.05, (name, dead)
        assert 0.5 * k <= l0 <= 1.5 * k, (name, l0, k)  # BatchTopK's inference threshold keeps L0 near k


@pytest.fixture(scope="module")
def relu(mlp_buffer, tmp_path_factory):
    """The reference: a ReLU transcoder with every default (L0 steered to sae.k = 32)."""
    got = train(mlp_buffer, tmp_path_factory.mktemp("relu"), "sae=relu")["relu"]
    print(f"relu: fvu={got['fvu']:.4f} l0={got['l0']:.1f} dead={got['dead_fraction']:.1%}")
    # Near its target (tens, not hundreds), with its silenced latents revived (without ghost grads
    # and with a 100K-token dead window, 18% of them stayed silent).
    assert got["fvu"] < 0.5 and 8 <= got["l0"] <= 80 and got["dead_fraction"] <= 0.05, got
    return got


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_a_penalised_transcoder_lands_at_its_target_l0(arch, relu, mlp_buffer, tmp_path):
    """Their L0 is steered to sae.k (here the ReLU's L0); JumpReLU's thresholds learn sqrt(d_in)
    times faster than the rest, else they cannot follow the encoder (L0 ~200 at k 32 on SmolLM2)."""
    k = round(relu["l0"])
    got = train(mlp_buffer, tmp_path / arch, f"sae={arch}", f"sae.k={k}")[arch]
    fvu, l0, dead = got["fvu"], got["l0"], got["dead_fraction"]
    print(f"relu: fvu={relu['fvu']:.4f} l0={relu['l0']:.1f}; {arch}: fvu={fvu:.4f} l0={l0:.1f} dead={dead:.1%}")
    assert fvu <= 2 * relu["fvu"] and dead <= 0.05 and k / 3 <= l0 <= 3 * k, (fvu, l0, dead)


@pytest.mark.slow
@pytest.mark.parametrize("act", ["topk", "batchtopk", "jumprelu"])
def test_a_cross_layer_transcoder_trains_with_the_defaults(act, relu, mlp_buffer, tmp_path):
    """Both layers, k per layer at the ReLU's L0 (a layer's FVU against the per-layer ReLU's)."""
    k = round(relu["l0"])
    got = run_training(compose_train_config([
        "data=buffer", f"data.buffer.path={mlp_buffer}", "sae=clt", f"sae.clt_activation={act}", f"sae.k={k}",
        "sae.expansion_factor=16", "train=smoke", "train.steps=300", "train.batch_size=256", "train.progress=false",
        "train.eval_every=0", f"train.out_dir={tmp_path}"]), heldout=HELDOUT_BATCHES).eval_metrics["clt"]
    print(f"clt {act}: fvu={got['fvu']:.4f} l0={got['l0']:.1f} dead={got['dead_fraction']:.1%}")
    assert got["fvu"] <= 2 * relu["fvu"] and got["dead_fraction"] <= 0.05, got


def test_a_diverged_run_is_named_with_the_fix():
    from sae.runners.train import divergence

    assert divergence({"fvu": 0.2, "relative_norm": 0.9}) is None
    said = divergence({"fvu": 484.0, "relative_norm": 19.0})
    assert said.startswith("diverged: held-out FVU 484") and "19x the target's" in said and "data.normalize" in said
    assert divergence({"fvu": 0.9, "relative_norm": 0.2}) is not None  # a collapsed reconstruction


def test_a_matryoshka_batchtopk_transcoder_trains_at_twice_the_lr_rule(tmp_path):
    """Its rarely chosen wide-group latents grow from a zero decoder too slowly at the rule's rate
    (SmolLM2: 13.1% dead; twice the rate: 1.6%); SAEs and other families keep the rule."""
    import torch

    from sae.buffer.tensor_source import TensorSource
    from sae.models import SAEConfig, build_sae
    from sae.train.config import TrainConfig
    from sae.train.schedule import default_lr
    from sae.train.trainer import Trainer

    def make(arch, transcode):
        return build_sae(SAEConfig(architecture=arch, transcode=transcode, num_latents=64, k=4), 8, 8)

    assert make("matryoshka_batchtopk", True).default_lr_scale == 2
    assert make("matryoshka_batchtopk", False).default_lr_scale == make("batchtopk", True).default_lr_scale == 1
    x = torch.randn(64, 8)
    cfg = TrainConfig(batch_size=16, steps=1, out_dir=str(tmp_path), progress=False, eval_every=0, final_report=False)
    trainer = Trainer(cfg, {"t": make("matryoshka_batchtopk", True)}, TensorSource(x, x.flip(1), 16, shuffle=False))
    assert trainer.optimizers["t"].param_groups[0]["lr"] == pytest.approx(2 * default_lr(64))
