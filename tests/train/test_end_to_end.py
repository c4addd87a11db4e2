"""End-to-end training (train.loss=kl, ce, kl+mse): the loss and its gradient against a dense
hand-written reference, a frozen model, resume, the runner, and the errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from sae.buffer.config import LiveConfig
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.tiny import save_tiny_model
from sae.models import SAEConfig, build_sae
from sae.train.config import TrainConfig
from sae.train.end_to_end import ContextSource, EndToEnd
from sae.train.trainer import Trainer

D, T, CTX = 32, 16, 4  # width, context length, contexts per step


@pytest.fixture(scope="module")
def e2e_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model = save_tiny_model(root / "model", "llama", layers=2, hidden=D)
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Entry {i} says {i * 7 % 13} keys map to {i % 5} values."}) + "\n"
                            for i in range(120)))
    return LiveConfig(model=ModelConfig(name=str(model), device="cpu"),
                      text=TextConfig(name=str(docs), context_length=T),
                      harvest=HarvestConfig(batch_size=4, progress=False), mixing_tokens=128, heldout_contexts=4)


def topk(seed=0, d_out=None, **kw):
    return build_sae(SAEConfig(architecture="topk", num_latents=64, k=4, selection_dtype="float32", **kw), D,
                     d_out, seed=seed)


def reference(folder, sae, tokens, loss):
    """KL (or CE) of the model with block 0's output replaced by a TopK SAE's reconstruction at
    the kept positions, written out densely in float64: its value and gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).double().eval()
    p = {n: t.detach().double().requires_grad_(True) for n, t in sae.named_parameters()}
    ids, mask, keep = tokens

    def encode_decode(x):
        pre = (x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]
        top = pre.topk(sae.cfg.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        return z @ p["W_dec"] + p["b_dec"]

    def splice(mod, args, out):
        h = (out[0] if isinstance(out, tuple) else out).clone()
        h[keep] = encode_decode(h[keep])
        return (h, *out[1:]) if isinstance(out, tuple) else h

    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask).logits
    handle = model.model.layers[0].register_forward_hook(splice)
    try:
        spliced = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    if loss == "kl":
        pc, ps = clean[keep].softmax(-1), spliced[keep].softmax(-1)
        value = (pc * (pc.log() - ps.log())).sum(-1).mean()
    else:
        counted = keep[:, :-1] & mask[:, 1:].bool()
        logp = spliced[:, :-1][counted].log_softmax(-1)
        value = -logp.gather(-1, ids[:, 1:][counted][:, None]).mean()
    grads = torch.autograd.grad(value, list(p.values()))
    return value, dict(zip(p, grads))


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_loss_and_gradient_equal_a_dense_reference(e2e_cfg, loss):
    source = ContextSource(e2e_cfg, CTX * T, hookpoint="layers.0", loss=loss)
    objective = EndToEnd(source, loss)
    batch = next(iter(source))
    step = objective.prepare(batch, 1)
    assert objective.skipped == [source.lm.model.model.layers[0]]  # the write site is block 0's output
    assert step.x.shape == (int(batch.keep.sum()), D) and step.y is None
    sae = topk()
    sae.init_from_data(step.x)  # a b_dec that is not zero
    out = objective.apply(sae(step.x), step.parts[0])
    ours = out.losses["loss"]  # one part, one rank: the mean itself (AuxK is zero: no dead latents yet)
    grads = torch.autograd.grad(ours, [p for _, p in sae.named_parameters()])
    want, want_grads = reference(e2e_cfg.model.name, sae, batch, loss)
    assert want.item() > 1e-3  # a random SAE changes the model's predictions
    torch.testing.assert_close(ours.double(), want, rtol=1e-4, atol=1e-6)
    for (name, _), g in zip(sae.named_parameters(), grads):
        torch.testing.assert_close(g.double(), want_grads[name], rtol=2e-3, atol=1e-6, msg=f"d{loss}/d{name}")
    torch.testing.assert_close(out.losses[loss].double(), want, rtol=1e-4, atol=1e-6)  # the logged mean


def test_kl_plus_mse_and_a_transcoder(e2e_cfg):
    source = ContextSource(e2e_cfg, CTX * T, hookpoint="layers.1.mlp_in", target_hookpoint="layers.1.mlp",
                           normalize="scale", loss="kl+mse")
    objective = EndToEnd(source, "kl+mse", mse_coefficient=0.5)
    step = objective.prepare(next(iter(source)), 2)
    assert len(step.parts) == 2 and step.y is not None and step.y.shape == step.x.shape
    assert step.parts[0].rows.stop == step.parts[1].rows.start
    # Normalised as the source normalises (E||x||^2 = d on the held-out rows).
    assert 0.3 * D < step.x.pow(2).sum(-1).mean() < 3 * D
    sae = topk(d_out=D)
    part = step.parts[1]
    out = objective.apply(sae(step.x[part.rows], step.y[part.rows]), part)
    # The part's weight turns its KL sum into the step's mean (averaged over the 2 parts by the trainer).
    n = part.rows.stop - part.rows.start
    assert part.weights[0] == pytest.approx(2 / step.x.shape[0])
    torch.testing.assert_close(out.losses["loss"], out.losses["kl"] * n * part.weights[0] + 0.5 * out.losses["fvu"])
    # A perfect transcoder leaves the model unchanged: KL 0.
    perfect = objective.spliced_logits(step.y[part.rows], part)
    torch.testing.assert_close(perfect[part.tokens.keep].log_softmax(-1), part.clean_logprobs, atol=1e-5, rtol=0)
    # Block 0 (wholly below the MLP of block 1) hands on the clean forward's output; running it gives the same.
    assert objective.skipped == [source.lm.model.model.layers[0]]
    x_hat = torch.randn_like(step.y[part.rows])
    reused = objective.spliced_logits(x_hat, part)
    ran = objective.spliced_logits(x_hat, part._replace(below=None))
    assert "forward" not in vars(source.lm.model.model.layers[0])  # the block's own forward is back
    torch.testing.assert_close(reused, ran, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reused, perfect, atol=1e-3)


def e2e_trainer(cfg, out_dir, steps=6, **kw):
    source = ContextSource(cfg, CTX * T, hookpoint="layers.0", loss="kl")
    tc = TrainConfig(batch_size=CTX * T, steps=steps, lr=3e-3, lr_warmup_steps=1, loss="kl", progress=False,
                     log_every=1, eval_every=0, checkpoint_every=3, out_dir=str(out_dir), **kw)
    return Trainer(tc, {"a": topk()}, source, objective=EndToEnd(source, "kl")), source


def test_training_lowers_kl_leaves_the_model_alone_and_resumes_exactly(e2e_cfg, tmp_path):
    trainer, source = e2e_trainer(e2e_cfg, tmp_path / "straight")
    model = source.lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = trainer.objective
    kls = []
    trainer.step_hooks.append(lambda t: kls.append(t.last_metrics["train/kl/a"]))
    trainer.fit()
    assert trainer.objective is first and kls[-1] < kls[0]
    assert 6 * CTX * (T - 4) <= trainer.tokens <= 6 * CTX * T  # the kept positions of 6 steps of 4 contexts
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    class Killed(Exception):
        pass

    def kill_at_4(t):
        if t.step == 4:
            raise Killed

    broken, _ = e2e_trainer(e2e_cfg, tmp_path / "resumed")
    broken.step_hooks.append(kill_at_4)
    with pytest.raises(Killed):
        broken.fit()
    resumed, _ = e2e_trainer(e2e_cfg, tmp_path / "resumed")
    resumed.fit()
    assert resumed.step == 6
    for k, v in trainer.saes["a"].state_dict().items():
        torch.testing.assert_close(resumed.saes["a"].state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_context_stream_splits_ranks_skips_and_resumes(e2e_cfg):
    def ids(src, n):
        return [b.input_ids for _, b in zip(range(n), src)]

    whole = ContextSource(e2e_cfg, CTX * T, hookpoint="layers.0")
    assert whole.contexts_per_step == CTX and whole.block_steps == 2
    full = ids(whole, 6)
    head_src = ContextSource(e2e_cfg, CTX * T, hookpoint="layers.0")
    head = ids(head_src, 3)
    tail_src = ContextSource(e2e_cfg, CTX * T, hookpoint="layers.0")
    tail_src.load_state_dict(head_src.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(head + ids(tail_src, 3), full))
    def rows(batches):  # contexts as a multiset (the tiny tokenizer makes a few of them equal)
        return Counter(tuple(r) for b in batches for r in b.tolist())

    ranks = [ContextSource(e2e_cfg, CTX * T, hookpoint="layers.0", rank=r, world_size=2) for r in range(2)]
    assert rows(ids(ranks[0], 2)) + rows(ids(ranks[1], 2)) == rows(full[:4])  # two blocks of 8 contexts
    skip_cfg = LiveConfig(model=e2e_cfg.model, text=e2e_cfg.text, harvest=e2e_cfg.harvest,
                          mixing_tokens=e2e_cfg.mixing_tokens, heldout_contexts=4, skip_contexts=8)
    assert rows(ids(ContextSource(skip_cfg, CTX * T, hookpoint="layers.0"), 2)) == rows(full[2:4])
    budget = LiveConfig(model=e2e_cfg.model, text=e2e_cfg.text, mixing_tokens=e2e_cfg.mixing_tokens,
                        heldout_contexts=4, harvest=HarvestConfig(batch_size=4, progress=False, max_tokens=3 * CTX * T))
    assert len(ids(ContextSource(budget, CTX * T, hookpoint="layers.0"), 99)) == 3


def test_clear_errors(e2e_cfg, tmp_path):
    with pytest.raises(ValueError, match="multiple of data.live.text.context_length=16"):
        ContextSource(e2e_cfg, 40, hookpoint="layers.0")
    encoder = LiveConfig(model=ModelConfig(name="all-MiniLM-L6-v2", device="cpu"), text=e2e_cfg.text,
                         harvest=e2e_cfg.harvest, heldout_contexts=4)
    with pytest.raises(ValueError, match="without a language-model head.*train.loss=mse"):
        ContextSource(encoder, CTX * T, hookpoint="layers.5")
    source = ContextSource(e2e_cfg, CTX * T, hookpoint="layers.0")
    with pytest.raises(ValueError, match="Trainer\\(objective="):
        Trainer(TrainConfig(batch_size=CTX * T, steps=1, loss="kl", out_dir=str(tmp_path / "x")), {"a": topk()}, source)
    with pytest.raises(ValueError, match="train.loss='bogus' must be one of mse, kl, ce, kl\\+mse"):
        Trainer(TrainConfig(batch_size=CTX * T, steps=1, loss="bogus", out_dir=str(tmp_path / "x")), {"a": topk()},
                torch.randn(64, D))
    source.lm.model.lm_head.weight.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="must be frozen.*lm_head.weight"):
            EndToEnd(source, "kl")
    finally:
        source.lm.model.lm_head.weight.requires_grad_(False)


def test_sae_train_runs_end_to_end_and_fine_tunes_a_trained_sae(e2e_cfg, tmp_path):
    from sae.runners.config import compose_train_config
    from sae.runners.train import run_training

    base = ["data=live", f"data.live.model.name={e2e_cfg.model.name}", f"data.live.text.name={e2e_cfg.text.name}",
            f"data.live.text.context_length={T}", "data.hookpoint=layers.0", "data.live.heldout_contexts=4",
            "train=smoke", "train.batch_size=64", "train.progress=false", "train.eval_every=2",
            "train.log_every=1", "sae.k=4", "sae.expansion_factor=2"]
    from sae.export.export import export_checkpoint

    mse = run_training(compose_train_config([*base, "train.steps=4", f"train.out_dir={tmp_path / 'mse'}"]))
    # Fine-tuned from the SAE as another library publishes it (SAELens' format, read by load_pretrained).
    export_checkpoint(mse.final_dirs["topk"], tmp_path / "published", "saelens")
    kl = run_training(compose_train_config([*base, "train.steps=3", "train.loss=kl+mse", "train.mse_coefficient=0.1",
                                            f"train.init_from={tmp_path / 'published'}", "data.live.skip_contexts=16",
                                            f"train.out_dir={tmp_path / 'kl'}"]))
    logged = [json.loads(line) for line in (tmp_path / "kl" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in logged if "train/kl/finetune" in m]
    assert len(trained) == 3 and all(m["train/loss/finetune"] > m["train/kl/finetune"] for m in trained)
    assert any("eval/fvu/finetune" in m for m in logged)  # the periodic held-out evaluation runs
    assert kl.eval_metrics["finetune"]["fvu"] < 1.5
    cfg = json.loads((kl.final_dirs["finetune"] / "cfg.json").read_text())
    assert cfg["data"]["live"]["skip_contexts"] == 16 and cfg["data"]["hookpoint"] == "layers.0"


@pytest.mark.parametrize("extra, message", [
    (["data=synthetic"], "train.loss=kl splices the SAE into the model's forward.*use data=live"),
    (["data=live", "data.hookpoints=[layers.0,layers.1]"], "data.hookpoints trains one per hook point with "
                                                          "train.loss=mse only"),
    (["data=live", "sae=clt"], "not implemented for cross-layer transcoders"),
])
def test_sae_train_refuses_what_end_to_end_cannot_do(e2e_cfg, tmp_path, extra, message):
    from sae.runners.config import compose_train_config
    from sae.runners.train import run_training

    run = compose_train_config([*extra, f"data.live.model.name={e2e_cfg.model.name}", "data.hookpoint=layers.0",
                                f"data.live.text.name={e2e_cfg.text.name}", "train=smoke", "train.loss=kl",
                                f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=message):
        run_training(run)
    assert not (tmp_path / "run").exists()
