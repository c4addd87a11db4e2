"""Evaluating a cross-layer transcoder: the all-MLP splice, and harvest -> sae-train sae=clt -> sae-eval."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from sae.eval.splice import SpliceBatch, clt_splice_eval, resolve_site

LAYERS = 3


class MLPOracle:
    """A stand-in CLT whose "codes" of layer i are its MLP input and whose layer-j output is MLP j of
    them: splicing it must reproduce the model exactly, if every read and write is wired to its layer."""

    acausal, n_layers = False, LAYERS

    def __init__(self, model, scale: float = 1.0):
        self.mlps, self.scale = [blk.mlp for blk in model.transformer.h], scale
        self.reads: list[int] = []

    def parameters(self):
        return iter([torch.zeros(1)])

    def encode_layer(self, i: int, x: Tensor, sparse: bool = False) -> Tensor:  # dense either way
        self.reads.append(i)
        return x

    def encode_layers(self, xs: list[Tensor], sparse: bool = False) -> list[Tensor]:
        return list(xs)

    def decode_layer(self, j: int, codes: list[Tensor | None]) -> Tensor:
        assert all(c is not None for c in codes[: j + 1])
        return self.scale * self.mlps[j].forward(codes[j])  # .forward: not through the splice hooks


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=LAYERS, n_embd=32, n_head=2, vocab_size=97, n_positions=64, initializer_range=0.3,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0
    keep = mask.bool().clone()
    keep[:, 0] = False
    return [SpliceBatch(ids[:2], mask[:2], keep[:2]), SpliceBatch(ids[2:], mask[2:], keep[2:])]


def _sites(model):
    return ([resolve_site(model, f"layers.{i}.mlp_in") for i in range(LAYERS)],
            [resolve_site(model, f"layers.{i}.mlp") for i in range(LAYERS)])


@pytest.mark.parametrize("inputs", ["replacement", "clean"])
def test_an_exact_clt_recovers_everything_and_a_scaled_one_sits_between(gpt2, batches, inputs):
    reads, writes = _sites(gpt2)
    oracle = MLPOracle(gpt2)
    m = clt_splice_eval(gpt2, reads, writes, oracle, batches, "causal_lm", inputs=inputs)
    assert abs(m["ce_loss_zero"] - m["ce_loss_clean"]) > 0.05 and m["kl_div_zero"] > 0.01  # the MLPs matter here
    assert m["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-9) and m["kl_div_sae"] == pytest.approx(0, abs=1e-12)
    if inputs == "replacement":
        assert oracle.reads[:LAYERS] == list(range(LAYERS))  # layer by layer, in the spliced forward
    half = clt_splice_eval(gpt2, reads, writes, MLPOracle(gpt2, 0.5), batches, "causal_lm", inputs=inputs)
    assert 0 < half["kl_div_sae"] < half["kl_div_zero"] and half["ce_loss_sae"] != m["ce_loss_clean"]
    zero = clt_splice_eval(gpt2, reads, writes, MLPOracle(gpt2, 0.0), batches, "causal_lm", inputs=inputs)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)


def test_replacement_inputs_come_from_the_spliced_forward(gpt2, batches):
    """With layer 0 replaced by half its output, layer 1's codes differ from the clean ones."""
    reads, writes = _sites(gpt2)

    class Recorder(MLPOracle):
        def decode_layer(self, j, codes):
            self.seen = getattr(self, "seen", {}) | {j: codes[j].clone()}
            return (0.5 if j == 0 else 1.0) * self.mlps[j].forward(codes[j])

    rep, clean = Recorder(gpt2), Recorder(gpt2)
    clt_splice_eval(gpt2, reads, writes, rep, batches[:1], "causal_lm", inputs="replacement")
    clt_splice_eval(gpt2, reads, writes, clean, batches[:1], "causal_lm", inputs="clean")
    torch.testing.assert_close(rep.seen[0], clean.seen[0])  # layer 0 reads the clean embedding in both
    assert not torch.allclose(rep.seen[1], clean.seen[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, harvest_mlps):
    """A 3-layer tiny GPT-2 whose MLPs matter (init range 0.3), one harvest of its MLPs, a CLT trained on it."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from sae.harvest.tiny import save_tiny_model
    from sae.runners.config import compose_train_config
    from sae.runners.train import run_training

    root = tmp_path_factory.mktemp("clt_eval")
    model = save_tiny_model(root / "model", "gpt2", layers=LAYERS, hidden=32)
    cfg = GPT2Config.from_pretrained(model)
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model)
    docs = root / "docs.txt"
    docs.write_text("".join(f"Line {i}: the list holds {i % 7} items and {i % 5} keys.\n" for i in range(300)))
    harvest_mlps(model, docs, root / "buf")
    run = compose_train_config(["sae=clt", "data=buffer", f"data.buffer.path={root / 'buf'}", "train=smoke",
                                "train.steps=80", "train.batch_size=256", "train.lr=0.01", "train.progress=false",
                                f"train.out_dir={root / 'run'}", "sae.k=6", "sae.expansion_factor=2"])
    return root, run_training(run)


@pytest.mark.slow
def test_sae_eval_reports_per_layer_fvu_and_the_spliced_replacement_model(trained):
    from sae.runners.config import compose_eval_config
    from sae.runners.evaluate import run_eval, summary_line

    root, res = trained
    result = run_eval(compose_eval_config([f"sae_path={root / 'run'}", f"out_dir={root / 'ev'}", "device=cpu",
                                           "splice.contexts=12", "examples.num_latents=3", "examples.per_latent=2"]))
    r = json.loads(result.report_json.read_text())
    layers = r["clt"]["layers"]
    # Trained on per-layer normalised rows (data.normalize=auto), scored on raw rows with the
    # normalisers folded in: the same FVU as training's held-out score, up to the rows drawn.
    cfg = json.loads((res.final_dirs["clt"] / "cfg.json").read_text())
    assert [e["x"]["mode"] for e in cfg["normalization"]["per_layer"]] == ["scale"] * LAYERS
    assert r["metrics"]["fvu"] == pytest.approx(res.eval_metrics["clt"]["fvu"], rel=0.1)  # 0.2847 vs 0.2828
    assert [x["target"] for x in layers] == [f"layers.{i}.mlp" for i in range(LAYERS)]
    assert all(0 < x["fvu"] < 0.9 for x in layers), layers
    assert r["clt"]["fvu_sum"] == pytest.approx(sum(x["fvu"] for x in layers))
    assert sum(x["l0"] for x in layers) == pytest.approx(r["metrics"]["l0"], rel=1e-6)
    assert all(5 <= x["l0"] <= 6 for x in layers)  # k = 6 per layer (a few selected values may be 0)
    sp = r["splice"]
    assert sp["inputs"] == "replacement" and sp["write"] == [f"transformer.h.{i}.mlp" for i in range(LAYERS)]
    m = sp["metrics"]
    # A random model's next-token CE says little (zero ablation may even lower it); KL to the clean
    # model is the fidelity figure here: all three MLPs ablated move it far, the CLT much less.
    assert m["kl_div_zero"] > 0.5 and 0.5 < m["kl_div_score"] < 1.0, m
    assert m["ce_loss_recovered"] == pytest.approx((m["ce_loss_zero"] - m["ce_loss_sae"])
                                                   / (m["ce_loss_zero"] - m["ce_loss_clean"]))
    html = result.report_html.read_text()
    assert "Per layer" in html and "layers.2.mlp_in → layers.2.mlp" in html
    assert "CE recovered=" in summary_line(result)
    assert r["examples"] and r["examples"][0]["promoted"]  # dashboards: residual-stream directions
    # The page as a person sees it (headless Chromium): plots load, tables (the per-layer one
    # included) and every dashboard panel are drawn.
    from sae.eval.screenshot import check_report, find_browser

    if find_browser() is None:
        return  # tests/eval/test_eval_report_e2e.py reports the missing browser as a skip
    check = check_report(result.report_html, root / "shot.png")
    assert check.images > 0 and check.images_ok == check.images
    assert len(check.table_boxes) == 3 and not check.blank, check  # summary, splice, per layer
    assert len(check.panel_boxes) == 3 * len(r["examples"]) and check.ok


@pytest.mark.parametrize("acausal", [False, True], ids=["clt", "crosscoder"])
def test_decoder_statistics_without_the_dense_decoder_equal_the_dense_ones(acausal):
    """Decoder norms, residual directions and the decoder mean max cosine are computed per group
    (the dense [N L, N M] decoder does not fit a GPU at real sizes): equal to the dense forms."""
    from sae.eval import clt as clt_eval
    from sae.eval.metrics import mean_max_cosine
    from sae.models import SAEConfig, build_sae

    clt = build_sae(SAEConfig(architecture="clt", clt_layers=3, clt_acausal=acausal, num_latents=40, k=4,
                              transcode=True), 3 * 6, 3 * 6, seed=0)
    with torch.no_grad():  # unequal norms, and a near-duplicate pair across groups
        for i, w in enumerate(clt.W_dec):
            w.mul_(torch.rand(w.shape[0], 1, 1, generator=torch.Generator().manual_seed(i)) + 0.5)
        clt.W_dec[2][5, -1] = clt.W_dec[0][7, -1] * 3
        clt.W_dec[2][5, :-1] = 0
        if acausal:
            clt.W_dec[0][7, :-1] = 0
    dense = clt.dense_decoder()
    n = clt.n_layers
    assert torch.allclose(clt_eval.decoder_norms(clt), dense.norm(dim=1), rtol=1e-6)
    _, directions = clt_eval.weight_views(clt)
    assert torch.allclose(directions, dense.view(dense.shape[0], n, clt.d_model).sum(1), atol=1e-6)
    for sample in (0, 50):
        got, want = clt_eval.decoder_mean_max_cosine(clt, sample, chunk=16), mean_max_cosine(dense, sample)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), sample
