"""Cross-layer transcoder and acausal crosscoder against a dense hand-written reference."""

from __future__ import annotations

import pytest
import torch

from sae.models import SAEConfig, SparseCodes, build_sae
from sae.models.jumprelu import _JumpReLU, _Step
from sae.train.artifact import load_sae, save_sae

N, M, L, K, B = 3, 8, 16, 3, 32
ACTS = ["topk", "batchtopk", "jumprelu"]


def make(act="topk", acausal=False, seed=0, **kw):
    # The mechanics at a generic point: random unit-norm decoder rows (a transcoder's default decoder
    # starts at zero, where the encoder has no gradient; test_a_transcoder_clt_starts_as_sparsify_s).
    kw.setdefault("normalize_decoder", True)
    cfg = SAEConfig(architecture="clt", clt_layers=N, clt_activation=act, clt_acausal=acausal, num_latents=L, k=K,
                    transcode=True, batch_topk_cap=6, **kw)  # cap * k >= L: every latent is a candidate
    return build_sae(cfg, N * M, seed=seed)


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N * M, generator=g)
    y = x @ torch.randn(N * M, N * M, generator=g) / (N * M) ** 0.5 + 0.1 * torch.randn(B, N * M, generator=g)
    return x, y


def dense_weights(clt):
    """[N L, D] encoder and decoder with the layout's block masks, written out block by block."""
    W_enc = torch.zeros(N * L, N * M)
    W_dec = torch.zeros(N * L, N * M)
    for i in range(N):
        rows = slice(i * L, (i + 1) * L)
        if clt.acausal:
            W_enc[rows] = clt.W_enc[i]
        else:
            W_enc[rows, i * M:(i + 1) * M] = clt.W_enc[i]
        for j in range(N):
            if clt.acausal or j >= i:  # causal: upper triangular (group i writes layers j >= i)
                W_dec[rows, j * M:(j + 1) * M] = clt.W_dec[i][:, j - (0 if clt.acausal else i)]
    return W_enc, W_dec


def reference(clt, x, y):
    """Loss terms and reconstruction of a dense computation through the masked matrices."""
    W_enc, W_dec = dense_weights(clt)
    pre = x @ W_enc.T + clt.b_enc.flatten()
    groups = []
    for i in range(N):
        p = pre[:, i * L:(i + 1) * L]
        if clt.activation == "topk":
            mask = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.detach().topk(K, dim=1).indices, True)
            groups.append(p.relu() * mask)
        elif clt.activation == "batchtopk":
            z = p.relu()
            kth = z.detach().flatten().topk(K * B).values.min()
            groups.append(z * (z.detach() >= kth))
        else:
            eps = clt.cfg.jumprelu_bandwidth * float(clt.act_scale[i])
            groups.append(_JumpReLU.apply(p.relu(), clt.log_threshold[i].exp(), eps))
    a = torch.cat(groups, 1)
    y_hat = a @ W_dec + clt.b_dec.flatten()
    fvus = [((y_hat - y)[:, j * M:(j + 1) * M]).pow(2).sum() / ((y[:, j * M:(j + 1) * M]
            - y[:, j * M:(j + 1) * M].mean(0)).pow(2).sum()) for j in range(N)]
    loss = sum(fvus)
    if clt.activation == "jumprelu":
        eps = [clt.cfg.jumprelu_bandwidth * float(clt.act_scale[i]) for i in range(N)]
        l0 = sum(_Step.apply(pre[:, i * L:(i + 1) * L].relu(), clt.log_threshold[i].exp(), eps[i]).sum(-1).mean()
                 for i in range(N))
        loss = loss + clt.cfg.l0_coefficient * l0
    return y_hat, a, fvus, loss


@pytest.mark.parametrize("acausal", [False, True], ids=["clt", "crosscoder"])
@pytest.mark.parametrize("act", ACTS)
def test_forward_and_gradients_equal_the_dense_masked_reference(act, acausal):
    x, y = data()
    clt = make(act, acausal)
    clt.init_from_data(x, y)
    ref = make(act, acausal)
    ref.load_state_dict(clt.state_dict())
    out = clt(x, y)
    out.losses["loss"].backward()
    y_ref, a_ref, fvus, loss_ref = reference(ref, x, y)
    loss_ref.backward()
    torch.testing.assert_close(out.x_hat, y_ref, rtol=1e-5, atol=1e-5)
    for j in range(N):
        torch.testing.assert_close(out.losses[f"fvu/layer{j}"], fvus[j], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss"], loss_ref, rtol=1e-5, atol=1e-5)
    dense = out.codes if act == "jumprelu" else \
        torch.zeros(B, N * L).scatter_add_(1, out.codes.idx, out.codes.vals.detach())
    torch.testing.assert_close(dense.detach(), a_ref.detach(), rtol=1e-5, atol=1e-6)
    l0 = (a_ref > 0).sum(1).float().mean()
    assert 0 < l0 <= N * L / 2  # sparse codes, and some latents fire
    if act == "topk":
        assert l0 == pytest.approx(N * K)
    for (name, p), (_, q) in zip(clt.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=f"{act}: grad of {name}")
    assert float(clt.W_enc.grad.abs().sum()) > 0 and all(float(p.grad.abs().sum()) > 0 for p in clt.W_dec)


def test_parameter_interface_and_sizes():
    clt, cc = make("jumprelu"), make("jumprelu", acausal=True)
    assert (clt.n_layers, clt.d_model, clt.latents_per_layer, clt.num_latents) == (N, M, L, N * L)
    assert clt.d_in == clt.d_out == N * M and clt.activation == "jumprelu" and not clt.acausal and cc.acausal
    assert clt.W_enc.shape == (N, L, M) and cc.W_enc.shape == (N, L, N * M)
    assert clt.b_enc.shape == (N, L) and clt.b_dec.shape == (N, M) and clt.log_threshold.shape == (N, L)
    assert [tuple(w.shape) for w in clt.W_dec] == [(L, N - i, M) for i in range(N)]
    assert [tuple(w.shape) for w in cc.W_dec] == [(L, N, M)] * N
    causal = sum(w.numel() for w in clt.W_dec)
    assert causal == N * (N + 1) // 2 * M * L and sum(w.numel() for w in cc.W_dec) == N * N * M * L
    with_ef = build_sae(SAEConfig(architecture="clt", clt_layers=2, expansion_factor=4, k=2, transcode=True), 2 * 8)
    assert with_ef.latents_per_layer == 32 and with_ef.num_latents == 64  # expansion relative to d_model
    # transcode=false: reconstruct x itself (a multi-layer SAE), b_dec subtracted from the input per layer.
    sae = build_sae(SAEConfig(architecture="clt", clt_layers=N, num_latents=L, k=K), N * M, seed=0)
    x, _ = data(7)
    sae.init_from_data(x)
    out = sae(x)
    assert out.x_hat.shape == x.shape and out.losses["fvu"] < 0.8 * N  # tied init: better than the mean
    torch.testing.assert_close(sae.encoder_input(x), x - sae.b_dec.flatten())


@pytest.mark.parametrize("acausal", [False, True], ids=["clt", "crosscoder"])
@pytest.mark.parametrize("act", ACTS)
def test_layer_outputs_depend_only_on_allowed_latents_and_inputs(act, acausal):
    """By autograd: output layer j of the CLT never depends on groups i > j (their encoder, their
    decoder rows, their codes) nor on the MLP inputs of layers > j; the crosscoder depends on all."""
    x, y = data(1)
    clt = make(act, acausal)
    clt.init_from_data(x, y)
    for j in range(N):
        clt.zero_grad()
        xg = x.clone().requires_grad_(True)
        out = clt(xg, y)
        out.x_hat[:, j * M:(j + 1) * M].pow(2).sum().backward()
        for i in range(N):
            allowed = acausal or i <= j
            grads = (clt.W_enc.grad[i], clt.W_dec[i].grad, xg.grad[:, i * M:(i + 1) * M])
            touched = [float(t.abs().sum()) > 0 for t in grads]
            assert touched == [allowed] * 3, (act, acausal, "output", j, "group", i, touched)
        # The same through the per-layer API: codes of each group -> reconstruction of each layer.
        codes = [c.detach().requires_grad_(True) for c in clt.encode_layers(list(x.split(M, dim=1)))]
        clt.decode_layers(codes)[j].pow(2).sum().backward()
        assert [float(c.grad.abs().sum()) > 0 for c in codes] == [acausal or i <= j for i in range(N)]


@pytest.mark.parametrize("act", ACTS)
def test_per_layer_api_matches_the_concatenated_layout(act):
    x, y = data(2)
    clt = make(act).eval()
    clt.init_from_data(x, y)
    codes = clt.encode(x)
    per_layer = clt.encode_layers(list(x.split(M, dim=1)))
    assert [tuple(c.shape) for c in per_layer] == [(B, L)] * N
    recon = clt.decode_layers(per_layer)
    assert [tuple(r.shape) for r in recon] == [(B, M)] * N
    torch.testing.assert_close(torch.cat(recon, 1), clt.decode(codes), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(clt.decode(codes), clt(x, y).x_hat, rtol=1e-5, atol=1e-5)
    # Layer by layer (the replacement model's order): group i from layer i's input, output j from groups <= j.
    one = [clt.encode_layer(i, x[:, i * M:(i + 1) * M]) for i in range(N)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(one, per_layer))
    for j in range(N):
        torch.testing.assert_close(clt.decode_layer(j, one[:j + 1] + [None] * (N - j - 1)), recon[j])
    # Sparse per-layer codes (the replacement model's, without [B, L] matrices) decode the same.
    sparse_one = [clt.encode_layer(i, x[:, i * M:(i + 1) * M], sparse=True) for i in range(N)]
    sparse_all = clt.encode_layers(list(x.split(M, dim=1)), sparse=True)
    assert all(isinstance(c, SparseCodes) for c in sparse_one + sparse_all) == isinstance(codes, SparseCodes)
    for j in range(N):
        torch.testing.assert_close(clt.decode_layer(j, sparse_one[:j + 1] + [None] * (N - j - 1)), recon[j],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clt.decode_layer(j, sparse_all), recon[j], rtol=1e-5, atol=1e-5)
    if isinstance(codes, SparseCodes):  # slots in another order decode the same (the general path)
        perm = torch.randperm(codes.idx.shape[1], generator=torch.Generator().manual_seed(0))
        shuffled = SparseCodes(codes.vals[:, perm], codes.idx[:, perm])
        torch.testing.assert_close(clt.decode(shuffled), clt.decode(codes), rtol=1e-5, atol=1e-5)


def test_batchtopk_uses_a_running_threshold_per_layer_at_inference():
    x, y = data(3)
    clt = make("batchtopk")
    clt.init_from_data(x, y)
    clt(x, y)
    thr = clt.threshold.clone()
    assert thr.shape == (N,) and bool((thr > 0).all())
    clt.eval()
    dense = clt.encode_layers(list(x.split(M, dim=1)))
    for i in range(N):
        pre = (x[:, i * M:(i + 1) * M] @ clt.W_enc[i].T + clt.b_enc[i]).detach()
        torch.testing.assert_close(dense[i], pre.relu() * (pre > thr[i]))
    # One token alone gets the same codes as inside its batch (no batch dependence at inference).
    alone = clt.encode_layers([t[:1] for t in x.split(M, dim=1)])
    assert all(torch.allclose(a[0], d[0], atol=1e-6) for a, d in zip(alone, dense))


def test_decoder_rows_are_unit_norm_over_all_output_layers():
    x, y = data(4)
    clt = make("topk")
    clt.init_from_data(x, y)
    for i, W in enumerate(clt.W_dec):
        assert W.shape[1] == N - i
        torch.testing.assert_close(W.flatten(1).norm(dim=1), torch.ones(L))
        assert float(W.detach()[:, 0].norm(dim=1).max()) < 1 or i == N - 1  # a row's norm is spread over its layers
    clt(x, y).losses["loss"].backward()
    clt.remove_parallel_grad_()
    for W in clt.W_dec:
        dots = (W.grad.flatten(1) * W.detach().flatten(1)).sum(1)
        assert float(dots.abs().max()) < 1e-6 and float(W.grad.abs().sum()) > 0
    # A step that does not renormalise (the fused GPU step) is renormalised by the next training forward.
    with torch.no_grad():
        for W in clt.W_dec:
            W.mul_(3.0)
    clt(x, y)
    assert all(torch.allclose(W.flatten(1).norm(dim=1), torch.ones(L)) for W in clt.W_dec)
    before = [W.detach().clone() for W in clt.W_dec]
    clt(x, y)  # unchanged decoder: left alone (bitwise)
    assert all(torch.equal(a, W) for a, W in zip(before, clt.W_dec))


def test_init_from_data_sets_b_dec_per_layer_and_fits_the_encoder_scale():
    x, y = data(5)
    y = y + torch.arange(N).repeat_interleave(M) * 5.0  # very different means per layer
    fitted, raw = make("topk"), make("topk", fit_encoder_scale=False)
    fitted.init_from_data(x, y)
    raw.init_from_data(x, y)
    for j in range(N):
        torch.testing.assert_close(fitted.b_dec[j].detach(), y[:, j * M:(j + 1) * M].mean(0), atol=0.5, rtol=0)
    f_fit, f_raw = fitted(x, y).losses["fvu"].item(), raw(x, y).losses["fvu"].item()
    assert f_fit < N + 0.3 and f_fit < 0.8 * f_raw, (f_fit, f_raw)  # each group at least 0.1 of its own scale


def test_save_and_load_round_trip(tmp_path):
    x, y = data(6)
    clt = make("jumprelu", acausal=True)
    clt.init_from_data(x, y)
    save_sae(clt, tmp_path / "clt")
    back = load_sae(tmp_path / "clt")
    assert type(back).__name__ == "CrossLayerTranscoder" and back.acausal
    torch.testing.assert_close(back(x, y).x_hat, clt(x, y).x_hat)


@pytest.mark.parametrize("kw, match", [
    ({"clt_layers": 0}, "sae.clt_layers=0"),
    ({"clt_layers": 5}, "d_in = d_out = clt_layers"),
    ({"clt_layers": 3, "clt_activation": "relu"}, "sae.clt_activation='relu'"),
    ({"clt_layers": 3, "num_latents": 4, "k": 4}, "sae.k=4"),
])
def test_bad_configs_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        build_sae(SAEConfig(**{"architecture": "clt", "transcode": True, "num_latents": L, "k": K, **kw}), N * M)


def test_sparse_per_layer_decode_reads_strided_decoder_views_in_triton(monkeypatch):
    """decode_layer hands sparse_decode a strided [L, M] view of W_dec[i]; the Triton kernel (in the
    interpreter here, compiled on a GPU) must take its strides as the eager path does."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SAE_KERNEL_BACKEND", "triton")
    x, y = data(2)
    clt = make("topk").eval()
    clt.init_from_data(x, y)
    dense = clt.encode_layers(list(x.split(M, dim=1)))
    sparse = clt.encode_layers(list(x.split(M, dim=1)), sparse=True)
    assert not clt.W_dec[0][:, 1].is_contiguous()
    for j in range(N):
        torch.testing.assert_close(clt.decode_layer(j, sparse), clt.decode_layer(j, dense), rtol=1e-5, atol=1e-5)


def test_a_transcoder_clt_starts_as_sparsify_s():
    """Default (sae.normalize_decoder=null) CLT transcoder: zero decoder kept free of the unit-norm
    constraint, centred pre-activations, b_dec at the target's centre; a crosscoder on one point
    (transcode=false) keeps random unit rows."""
    x, y = data()
    clt = make("topk", normalize_decoder=None)
    assert not clt.normalize_decoder and all(float(p.detach().abs().sum()) == 0 for p in clt.W_dec)
    clt.init_from_data(x, y)
    for i, x_i in enumerate(clt.layer_inputs(x)):
        torch.testing.assert_close(clt.pre_activations(x_i, i).mean(0), torch.zeros(L), atol=1e-4, rtol=0)
    out = clt(x, y)
    torch.testing.assert_close(out.x_hat, clt.b_dec.flatten().expand_as(y))
    out.losses["loss"].backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in clt.W_dec)  # the decoder learns first
    sae = build_sae(SAEConfig(architecture="clt", clt_layers=N, num_latents=L, k=K), N * M, seed=0)
    assert sae.normalize_decoder and all(float(p.detach().abs().sum()) > 0 for p in sae.W_dec)
