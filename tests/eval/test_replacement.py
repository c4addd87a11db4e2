"""A model's per-layer transcoders as one replacement (``sae.eval.replacement``), against a hand-written
forward with every MLP's output replaced, on a tiny random Llama; and the checks ``sae-graph`` /
``sae-eval`` run on a circuit-tracer folder before any long work (``sae.use.graph``)."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import save_file

from sae.buffer.source import Batch
from sae.eval.lm import load_eval_model
from sae.eval.quick import evaluate_batches
from sae.eval.replacement import TranscoderSet, eval_contexts, evaluate_replacement
from sae.eval.splice import scored_positions
from sae.harvest.config import HarvestConfig, ModelConfig, TextConfig
from sae.harvest.harvester import Harvester
from sae.harvest.model import LoadedModel
from sae.harvest.text import load_text_dataset
from sae.harvest.tiny import save_tiny_model
from sae.models import SAEConfig, build_sae
from sae.use.graph import check_model, check_transcoders

N_LAYERS, D = 3, 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("replacement")
    model_dir = save_tiny_model(root / "llama", "llama", layers=N_LAYERS, hidden=D)
    docs = root / "docs.txt"
    docs.write_text("".join(f"Entry {i}: a deque pops {i % 11} items from the left.\n" for i in range(200)))
    lm, kind = load_eval_model(ModelConfig(name=str(model_dir)))
    assert kind == "causal_lm"
    reads = [f"layers.{i}.mlp_in" for i in range(N_LAYERS)]
    writes = [f"layers.{i}.mlp" for i in range(N_LAYERS)]
    body = LoadedModel(lm.model.base_model, lm.tokenizer, lm.device, lm.info)
    text = TextConfig(name=str(docs), context_length=16)
    harvester = Harvester(body, reads + writes, text, HarvestConfig(progress=False, batch_size=4))
    batches = eval_contexts(harvester, load_text_dataset(text), 2, 6, 3)
    transcoders = []
    for i in range(N_LAYERS):
        tc = build_sae(SAEConfig(architecture="jumprelu", num_latents=64, transcode=True, skip_connection=True),
                       D, D, seed=i).eval()
        with torch.no_grad():  # a transcoder's decoder starts at zero: give it something to write
            tc.W_dec.normal_(0, 0.2, generator=torch.Generator().manual_seed(i))
        transcoders.append(tc)
    return model_dir, lm, harvester, batches, reads, writes, transcoders


def _ce_with_hooks(lm, batches, hooks_for) -> float:
    """Mean next-token CE over the scored positions of ``batches``, with ``hooks_for(batch)`` (one
    forward hook per layer) on every MLP: hooks written here, not the splicer's."""
    layers = lm.model.model.layers
    total, count = 0.0, 0
    for b in batches:
        handles = [layers[i].mlp.register_forward_hook(h) for i, h in enumerate(hooks_for(b))]
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        finally:
            for h in handles:
                h.remove()
        counted = scored_positions(b.keep, b.attention_mask)
        lp = logits[:, :-1].double().log_softmax(-1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
        total += float(-lp[counted].sum())
        count += int(counted.sum())
    return total / count


def _hand_replaced_ce(lm, batches, transcoders) -> float:
    """Every MLP's output (at the kept positions) replaced by its transcoder of that MLP's input in
    the same forward."""
    def hooks_for(b):
        def hook(i):
            def replace(module, args, output):
                x = args[0][b.keep]
                new = output.clone()
                new[b.keep] = transcoders[i].reconstruct(x, transcoders[i].encode(x))
                return new
            return replace
        return [hook(i) for i in range(len(transcoders))]

    return _ce_with_hooks(lm, batches, hooks_for)


def test_replacement_ce_and_layer_scores_equal_a_hand_written_replacement(setup):
    _, lm, harvester, batches, reads, writes, transcoders = setup
    result = evaluate_replacement(TranscoderSet(transcoders), lm.model, harvester, batches, reads, writes,
                                  torch.device("cpu"))
    sp = result["splice"]
    assert sp["ce_loss_sae"] == pytest.approx(_hand_replaced_ce(lm, batches, transcoders), rel=1e-6)
    assert sp["kl_div_sae"] > 1e-4  # the replacement changed the model's predictions
    assert result["tokens"] == sum(int(b.keep.sum()) for b in batches) > 0
    for j, tc in enumerate(transcoders):  # each layer from the clean forward's rows, as sae-eval scores one
        rows = [harvester.capture(b.input_ids, b.attention_mask) for b in batches]
        x = torch.cat([r[reads[j]][b.keep] for r, b in zip(rows, batches)])
        y = torch.cat([r[writes[j]][b.keep] for r, b in zip(rows, batches)])
        want = evaluate_batches(tc, [Batch(x, y)])
        got = result["layers"][j]
        assert got["fvu"] == pytest.approx(want["fvu"], rel=1e-6) and got["l0"] == pytest.approx(want["l0"])
        assert got["dead_fraction"] == pytest.approx(want["dead_fraction"])


def _fake_folder(path, n_layers, d_model=D, widths=None, kind="transcoder_set"):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model_kind": kind, "feature_input_hook": "mlp.hook_in",
                                                      "feature_output_hook": "mlp.hook_out", "model_name": "tiny"}))
    for i in range(n_layers):
        L = (widths or {}).get(i, 16)
        save_file({"W_enc": torch.zeros(L, d_model), "W_dec": torch.zeros(L, d_model), "b_enc": torch.zeros(L),
                   "b_dec": torch.zeros(d_model)}, str(path / f"layer_{i}.safetensors"))
    return path


def test_bad_transcoder_folders_and_models_are_named_before_any_work(setup, tmp_path):
    model_dir = setup[0]
    ok = check_transcoders(_fake_folder(tmp_path / "ok", N_LAYERS))
    assert (ok.n_layers, ok.d_model, ok.d_transcoder) == (N_LAYERS, D, 16)
    assert check_model(str(model_dir), ok) == model_dir
    with pytest.raises(ValueError, match="no config.yaml.*--format circuit-tracer"):
        check_transcoders(tmp_path)
    gap = _fake_folder(tmp_path / "gap", N_LAYERS)
    (gap / "layer_1.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no transcoder for layer\(s\) \[1\] of 0..2.*target_hookpoints"):
        check_transcoders(gap)
    with pytest.raises(ValueError, match="layer 2's encoder is \\[8, 32\\].*one size"):
        check_transcoders(_fake_folder(tmp_path / "widths", N_LAYERS, widths={2: 8}))
    with pytest.raises(ValueError, match="2 layers of width 32, but model .* has 3 layers of width 32"):
        check_model(str(model_dir), check_transcoders(_fake_folder(tmp_path / "short", 2)))
    with pytest.raises(ValueError, match="3 layers of width 48, but model .* has 3 layers of width 32"):
        check_model(str(model_dir), check_transcoders(_fake_folder(tmp_path / "wide", N_LAYERS, d_model=48)))
    minilm = check_transcoders(_fake_folder(tmp_path / "minilm", 6, d_model=384))
    with pytest.raises(ValueError, match="not a causal language model"):
        check_model("all-MiniLM-L6-v2", minilm)


def test_sae_graph_refuses_bad_input_before_circuit_tracer_runs(setup, tmp_path, monkeypatch, capsys):
    from sae.runners.use import graph_main
    from sae.use.graph import GraphSettings, trace

    model_dir = setup[0]
    folder = _fake_folder(tmp_path / "ct", N_LAYERS)
    with pytest.raises(SystemExit, match="give a prompt to trace"):
        graph_main([str(folder), "--out", str(tmp_path / "g")])
    gap = _fake_folder(tmp_path / "gap", N_LAYERS)
    (gap / "layer_0.safetensors").unlink()
    with pytest.raises(SystemExit, match=r"sae-graph: error: .*no transcoder for layer\(s\) \[0\]"):
        graph_main([str(gap), "--out", str(tmp_path / "g"), "--prompt", "Hi"])
    with pytest.raises(SystemExit, match="3 layers of width 32, but model 'all-MiniLM-L6-v2'|not a causal language"):
        graph_main([str(folder), "--out", str(tmp_path / "g"), "--prompt", "Hi", "--model", "all-MiniLM-L6-v2"])
    monkeypatch.setenv("SAE_PEERS_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(RuntimeError, match="circuit-tracer runs in the peers venv.*does not exist"):
        trace(folder, GraphSettings(prompts=["Hi"]), model=str(model_dir))
    assert not (tmp_path / "g").exists()  # nothing written by a refused run


def test_a_cross_layer_transcoder_replacement_equals_a_hand_written_one(setup):
    """The CLT path: layer j's MLP output from the codes of layers 0..j, each read from the spliced
    forward's own MLP input (circuit-tracer's replacement model)."""
    _, lm, harvester, batches, reads, writes, _ = setup
    clt = build_sae(SAEConfig(architecture="clt", clt_layers=N_LAYERS, clt_activation="jumprelu", num_latents=16,
                              k=4, transcode=True), N_LAYERS * D, N_LAYERS * D, seed=0).eval()
    with torch.no_grad():
        for w in clt.W_dec:
            w.normal_(0, 0.1, generator=torch.Generator().manual_seed(w.shape[1]))
    result = evaluate_replacement(clt, lm.model, harvester, batches, reads, writes, torch.device("cpu"))
    def hooks_for(b):
        codes = [None] * N_LAYERS

        def hook(i):
            def replace(module, args, output):
                codes[i] = clt.encode_layer(i, args[0][b.keep])
                new = output.clone()
                new[b.keep] = clt.decode_layer(i, codes[: i + 1] + [None] * (N_LAYERS - i - 1))
                return new
            return replace
        return [hook(i) for i in range(N_LAYERS)]

    assert result["splice"]["ce_loss_sae"] == pytest.approx(_ce_with_hooks(lm, batches, hooks_for), rel=1e-6)
    assert result["splice"]["kl_div_sae"] > 1e-4
    rows = [harvester.capture(b.input_ids, b.attention_mask) for b in batches]
    x = torch.cat([torch.cat([r[hp][b.keep] for hp in reads], 1) for r, b in zip(rows, batches)])
    y = torch.cat([torch.cat([r[hp][b.keep] for hp in writes], 1) for r, b in zip(rows, batches)])
    with torch.no_grad():
        y_hat = clt.reconstruct(x, clt.encode(x))
    for j in range(N_LAYERS):  # each layer's FVU from the CLT's full forward on the clean rows
        part = slice(j * D, (j + 1) * D)
        err = (y_hat[:, part] - y[:, part]).double().pow(2).sum()
        var = (y[:, part].double() - y[:, part].double().mean(0)).pow(2).sum()
        assert result["layers"][j]["fvu"] == pytest.approx(float(err / var), rel=1e-5)
