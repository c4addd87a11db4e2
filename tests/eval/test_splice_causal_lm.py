"""Spliced-model fidelity on a small random-weight GPT-2 (2 layers, hidden 32): CE recovered and KL."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from sae.eval.splice import SpliceBatch, resolve_site, splice_eval
from sae.models import SAEConfig, SparseCoder


class IdentitySAE(SparseCoder):
    """A perfect "SAE": the codes are the input and the reconstruction is the codes."""

    sparse_codes = False

    def __init__(self, d: int):
        super().__init__(SAEConfig(num_latents=d), d)

    def encode(self, x_BD: Tensor) -> Tensor:
        return x_BD

    def decode(self, codes: Tensor) -> Tensor:
        return codes


class ZeroSAE(IdentitySAE):
    def decode(self, codes: Tensor) -> Tensor:
        return torch.zeros_like(codes)


def _recon(sae: SparseCoder):
    return lambda x: sae.reconstruct(x, sae.encode(x))


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # A larger init range than GPT-2's 0.02 so that ablating a layer clearly changes the logits.
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64, initializer_range=0.3,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(1, 97, (3, 12), generator=gen)
        mask = torch.ones_like(ids)
        mask[2, 8:] = 0  # right padding in one row
        keep = mask.bool().clone()
        keep[:, 0] = False  # the harvester drops position 0 (BOS) here
        out.append(SpliceBatch(ids, mask, keep))
    return out


def _ce_by_hand(model, batches) -> float:
    """Next-token CE at positions t with t kept and t+1 a real token, computed directly."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            lp = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double().log_softmax(-1)
            counted = b.keep[:, :-1] & b.attention_mask[:, 1:].bool()
            nll = -lp[:, :-1].gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
            total += nll[counted].sum().item()
            n += int(counted.sum())
    return total / n


def _kl_zero_by_hand(model, batches) -> float:
    """Mean KL(clean || block 0's output zeroed at kept positions) over kept positions, directly."""
    total, n = 0.0, 0
    for b in batches:
        def zero(module, args, out, keep=b.keep):
            from sae.eval.splice import first_tensor, with_first

            h = first_tensor(out).clone()
            h[keep] = 0
            return with_first(out, h)

        with torch.no_grad():
            clean = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double().log_softmax(-1)
            handle = model.transformer.h[0].register_forward_hook(zero)
            try:
                ablated = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double()
            finally:
                handle.remove()
        kl = (clean.exp() * (clean - ablated.log_softmax(-1))).sum(-1)
        total += kl[b.keep].sum().item()
        n += int(b.keep.sum())
    return total / n


@pytest.mark.parametrize("hookpoint", ["layers.0", "layers.1.mlp_in", "layers.0.mlp"])
def test_identity_recovers_everything_and_zero_recovers_nothing(gpt2, batches, hookpoint):
    site = resolve_site(gpt2, hookpoint)
    ident = splice_eval(gpt2, site, site, _recon(IdentitySAE(32)), batches, "causal_lm")
    assert ident["ce_loss_zero"] - ident["ce_loss_clean"] > 0.01  # the ablation matters in this model
    assert ident["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-9)
    assert ident["ce_loss_recovered_mean"] == pytest.approx(1.0, abs=1e-9)
    assert ident["kl_div_sae"] == pytest.approx(0.0, abs=1e-12)
    assert ident["kl_div_zero"] > 1e-3 and ident["kl_div_mean"] > 0
    assert ident["ce_loss_clean"] == pytest.approx(_ce_by_hand(gpt2, batches), rel=1e-12)
    if hookpoint == "layers.0":
        assert ident["kl_div_zero"] == pytest.approx(_kl_zero_by_hand(gpt2, batches), rel=1e-10)
    zero = splice_eval(gpt2, site, site, _recon(ZeroSAE(32)), batches, "causal_lm")
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert zero["kl_div_sae"] == pytest.approx(zero["kl_div_zero"], rel=1e-9)


def test_scores_in_small_slices_equal_the_whole_batch(gpt2, batches, monkeypatch):
    """CE and KL are scored in bounded [positions, vocabulary] slices (a 128k vocabulary in float64
    would not fit otherwise): slices of 5 positions, across sequence ends and padding, give the
    same figures as one slice per sequence."""
    import sae.eval.splice as splice_mod

    site = resolve_site(gpt2, "layers.0")
    gen = torch.Generator().manual_seed(3)
    noise = {}

    def noisy(x):  # the same noise in both runs
        key = (tuple(x.shape), float(x.sum()))
        if key not in noise:
            noise[key] = 0.3 * x.std() * torch.randn(x.shape, generator=gen)
        return x + noise[key]

    whole = splice_eval(gpt2, site, site, noisy, batches, "causal_lm")
    monkeypatch.setattr(splice_mod, "SCORE_CHUNK_ELEMENTS", 5 * 97)
    sliced = splice_eval(gpt2, site, site, noisy, batches, "causal_lm")
    assert sliced.keys() == whole.keys()
    for key, v in whole.items():
        assert sliced[key] == pytest.approx(v, rel=1e-12, abs=1e-15), key
    assert whole["kl_div_sae"] > 1e-6


def test_noisy_reconstruction_sits_between_and_only_kept_positions_change(gpt2, batches):
    site = resolve_site(gpt2, "layers.0")
    gen = torch.Generator().manual_seed(3)
    noisy = lambda x: x + 0.3 * x.std() * torch.randn(x.shape, generator=gen)
    m = splice_eval(gpt2, site, site, noisy, batches, "causal_lm")
    assert m["kl_div_sae"] > 1e-6 and m["kl_div_sae"] < m["kl_div_zero"]
    assert m["ce_loss_sae"] != m["ce_loss_clean"]
    # Nothing kept: nothing replaced, nothing scored.
    empty = [SpliceBatch(b.input_ids, b.attention_mask, torch.zeros_like(b.keep)) for b in batches]
    with pytest.raises(ValueError, match="no kept positions"):
        splice_eval(gpt2, site, site, noisy, empty, "causal_lm")


def test_mean_ablation_uses_the_mean_at_kept_positions(gpt2, batches):
    site = resolve_site(gpt2, "layers.0")
    rows = []
    hook = gpt2.transformer.h[0].register_forward_hook(lambda m, a, o: rows.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for b in batches:
            gpt2(input_ids=b.input_ids, attention_mask=b.attention_mask)
    hook.remove()
    mean = torch.cat([r[b.keep] for r, b in zip(rows, batches)]).double().mean(0).float()
    computed = splice_eval(gpt2, site, site, _recon(IdentitySAE(32)), batches, "causal_lm")
    given = splice_eval(gpt2, site, site, _recon(IdentitySAE(32)), batches, "causal_lm", mean=mean)
    assert given["ce_loss_mean"] == pytest.approx(computed["ce_loss_mean"], rel=1e-6)
    # (A constant shift would vanish in the next LayerNorm; shift along a random direction.)
    other = mean + torch.randn(32, generator=torch.Generator().manual_seed(5))
    shifted = splice_eval(gpt2, site, site, _recon(IdentitySAE(32)), batches, "causal_lm", mean=other)
    assert shifted["ce_loss_mean"] != pytest.approx(computed["ce_loss_mean"], rel=1e-6)


def test_transcoder_replaces_the_module_output_with_its_prediction(gpt2, batches):
    read, write = resolve_site(gpt2, "layers.1.mlp_in"), resolve_site(gpt2, "layers.1.mlp")
    assert (read.kind, write.kind) == ("input", "output")
    mlp = copy.deepcopy(gpt2.transformer.h[1].mlp)  # a copy: the hooked module must not run inside its hook
    perfect = splice_eval(gpt2, read, write, lambda x: mlp(x), batches, "causal_lm")
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["kl_div_sae"] == pytest.approx(0.0, abs=1e-9)
    # Predicting the MLP's *input* instead of its output is a real error: recovered well below 1.
    wrong = splice_eval(gpt2, read, write, lambda x: x, batches, "causal_lm")
    assert wrong["kl_div_sae"] > 1e-4 and wrong["ce_loss_recovered"] < 0.99
    # A transcoder whose input comes after its target cannot be spliced.
    with pytest.raises(RuntimeError, match="must come earlier"):
        splice_eval(gpt2, resolve_site(gpt2, "layers.1"), resolve_site(gpt2, "layers.0.mlp"), lambda x: x,
                    batches, "causal_lm")
