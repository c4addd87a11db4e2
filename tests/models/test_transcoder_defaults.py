"""Transcoders train with the defaults (issue: "Transcoders that train out of the box").

On a random tiny GPT-2, layer 0's MLP input -> MLP output: the target is ~100x smaller than the
input. With random unit-norm decoder rows a TopK transcoder used to end at FVU ~480 (output norm 19x
the target's) and a BatchTopK one at 99% dead latents; the TopK family now starts its decoder at zero,
free of the unit-norm constraint, with centred pre-activations (sparsify's transcoder init), and
BatchTopK's inference threshold tracks the final weights. Each family must come within 2x of the ReLU
transcoder's FVU at the ReLU's L0, with at most 5% dead latents, skip transcoders included.
"""

from __future__ import annotations

import pytest

from sae.buffer.fill import harvest_to_buffer
from sae.config import compose_harvest_config, compose_train_config
from sae.train.run import run_training

TOPK_FAMILY = ["topk", "batchtopk", "matryoshka_topk", "matryoshka_batchtopk"]


@pytest.fixture(scope="module")
def mlp_buffer(tiny_gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp") / "buf"
    h = compose_harvest_config([f"model.name={tiny_gpt2}", "text.context_length=64", "harvest.progress=false",
                                "harvest.max_tokens=24576", f"writer.out_dir={out}", "writer.shard_tokens=8192",
                                "hookpoints=[layers.0.mlp_in,layers.0.mlp]"])
    harvest_to_buffer(h.model, h.text, h.harvest, h.writer, h.hookpoints)
    return out


def train(buffer, out, *extra):
    return run_training(compose_train_config([
        "data=buffer", f"data.buffer.path={buffer}", "data.hookpoint=layers.0.mlp_in",
        "data.target_hookpoint=layers.0.mlp", "sae.transcode=true", "sae.expansion_factor=16", "train=smoke",
        "train.steps=300", "train.batch_size=256", "train.progress=false", "train.eval_every=0",
        f"train.out_dir={out}", *extra])).eval_metrics


@pytest.mark.slow
def test_every_topk_family_transcoder_trains_with_the_defaults(mlp_buffer, tmp_path):
    relu = train(mlp_buffer, tmp_path / "relu", "sae=relu")
    fvu_relu, l0_relu = relu["relu"]["fvu"], relu["relu"]["l0"]
    assert fvu_relu < 0.5, relu
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


@pytest.mark.slow
def test_a_jumprelu_transcoder_trains_with_the_defaults(mlp_buffer, tmp_path):
    """Its L0 is set by sae.k at the start and the L0 penalty after; the target is normalised
    (data.normalize=auto: scale for transcoders), else Adam's steps dwarf the decoder's scale and
    the thresholds swallow every latent (L0 0.6, 63% dead before)."""
    relu = train(mlp_buffer, tmp_path / "relu", "sae=relu")["relu"]
    got = train(mlp_buffer, tmp_path / "jr", "sae=jumprelu")["jumprelu"]
    (fvu_relu, l0_relu), (fvu, l0, dead) = ((relu[k] for k in ("fvu", "l0")),
                                            (got[k] for k in ("fvu", "l0", "dead_fraction")))
    print(f"relu: fvu={fvu_relu:.4f} l0={l0_relu:.1f}; jumprelu: fvu={fvu:.4f} l0={l0:.1f} dead={dead:.1%}")
    assert fvu <= 2 * fvu_relu and dead <= 0.05 and l0_relu / 3 <= l0 <= 3 * l0_relu, (fvu, l0, dead)


def test_a_diverged_run_is_named_with_the_fix():
    from sae.train.run import divergence

    assert divergence({"fvu": 0.2, "relative_norm": 0.9}) is None
    said = divergence({"fvu": 484.0, "relative_norm": 19.0})
    assert said.startswith("diverged: held-out FVU 484") and "19x the target's" in said and "data.normalize" in said
    assert divergence({"fvu": 0.9, "relative_norm": 0.2}) is not None  # a collapsed reconstruction
