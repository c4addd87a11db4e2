"""circuit-tracer export and import (sae/export/circuit_tracer.py): the files and tensors its loaders
read, round trips to 1e-6, normalisation folded, refusals, Hub download of one layer; and, marked
``peers``, circuit-tracer's own loaders (run once per module in .venv-peers by
peer_circuit_tracer.py) on our exports, and our import of what circuit-tracer saves."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from saes import D, L, activations, make_sae, outputs
from safetensors import safe_open

from sae.export import ExportItem, export_checkpoint, export_items, load_pretrained, load_pretrained_with_info
from sae.export import circuit_tracer as ct
from sae.models import SAEConfig, build_sae
from sae.runners.export import main as export_main
from sae.train.artifact import save_sae

N_LAYERS, M, LP = 3, 8, 16  # CLT: layers, d_model, latents per layer


def layer_items(arch: str = "jumprelu", skip: bool = False, n: int = N_LAYERS) -> list[ExportItem]:
    return [ExportItem(f"tc{i}", make_sae(arch, True, skip, D, seed=i), hookpoint=f"layers.{i}.mlp_in",
                       target_hookpoint=f"layers.{i}.mlp", model_name="EleutherAI/pythia-70m") for i in range(n)]


def make_clt(activation: str = "jumprelu", seed: int = 0, **over) -> torch.nn.Module:
    cfg = SAEConfig(architecture="clt", clt_layers=N_LAYERS, num_latents=LP, k=3, clt_activation=activation,
                    transcode=True, batch_topk_cap=math.ceil(LP / 3), **over)
    clt = build_sae(cfg, N_LAYERS * M, N_LAYERS * M, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in clt.named_parameters():
            if name != "log_threshold":
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
        if activation == "jumprelu":
            clt.log_threshold.copy_(torch.empty(N_LAYERS, LP).uniform_(0.05, 0.6, generator=gen).log())
        if activation == "batchtopk":
            clt.threshold.copy_(torch.tensor([0.2, 0.3, 0.4]))
    return clt.eval()


def clt_item(model, **meta) -> ExportItem:
    return ExportItem("clt", model, meta, model_name="EleutherAI/pythia-70m")


def layer_x(n: int = 64, seed: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, M, generator=gen) for _ in range(N_LAYERS)]


@torch.no_grad()
def clt_outputs(clt, xs):
    codes = clt.encode_layers(xs)
    return codes, clt.decode_layers(codes)


# --- per-layer transcoders ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch,skip", [("relu", False), ("jumprelu", False), ("jumprelu", True), ("relu", True)])
def test_transcoder_set_files_and_round_trip(tmp_path, arch, skip):
    items = layer_items(arch, skip)
    result = export_items(items, tmp_path / "ct", "circuit-tracer")
    out = tmp_path / "ct"
    assert result.folders == {f"tc{i}": out for i in range(N_LAYERS)}
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml"] + [
        f"layer_{i}.safetensors" for i in range(N_LAYERS)]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["model_kind"], cfg["feature_input_hook"], cfg["feature_output_hook"]) == (
        "transcoder_set", "mlp.hook_in", "mlp.hook_out")
    assert cfg["model_name"] == "EleutherAI/pythia-70m" and cfg["scan"] == "sae-forge/ct"
    with safe_open(str(out / "layer_1.safetensors"), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    want = {"W_enc": (L, D), "W_dec": (L, D), "b_enc": (L,), "b_dec": (D,)}
    want.update({"activation_function.threshold": (L,)} if arch == "jumprelu" else {})
    want.update({"W_skip": (D, D)} if skip else {})
    assert shapes == want
    x = activations()
    for i, item in enumerate(items):
        loaded = load_pretrained_with_info(out, hookpoint=f"layers.{i}.mlp_in")
        assert (loaded.format, loaded.name, loaded.hookpoint, loaded.target_hookpoint) == (
            "circuit-tracer", f"tc{i}", f"layers.{i}.mlp_in", f"layers.{i}.mlp")
        assert loaded.sae.architecture == arch and (loaded.sae.W_skip is not None) == skip
        for got, ref in zip(outputs(loaded.sae, x), outputs(item.sae, x)):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert [p.name for p in ct.read_all(out)] == [f"tc{i}" for i in range(N_LAYERS)]
    same = load_pretrained(out, hookpoint="layer_2")  # the file stem works too
    torch.testing.assert_close(outputs(same, x)[1], outputs(items[2].sae, x)[1], rtol=0, atol=1e-6)


def test_set_needs_a_hookpoint_and_says_which(tmp_path):
    export_items(layer_items(), tmp_path / "ct", "circuit-tracer")
    with pytest.raises(ValueError, match=r"holds 3 circuit-tracer transcoders \(layers.0.mlp_in, layers.1.mlp_in, "
                                         r"layers.2.mlp_in\); choose one with hookpoint="):
        load_pretrained(tmp_path / "ct")
    with pytest.raises(ValueError, match="not 'layers.7.mlp_in'"):
        load_pretrained(tmp_path / "ct", hookpoint="layers.7.mlp_in")


def test_batchtopk_exports_as_jumprelu_with_its_threshold(tmp_path):
    items = layer_items("batchtopk", n=1)  # cap * k >= L: inference is exactly the threshold
    export_items(items, tmp_path / "ct", "circuit-tracer")
    with safe_open(str(tmp_path / "ct" / "layer_0.safetensors"), framework="pt") as fh:
        assert torch.equal(fh.get_tensor("activation_function.threshold"), torch.full((L,), 0.3))
    loaded = load_pretrained(tmp_path / "ct")  # one layer: no hookpoint needed
    assert loaded.architecture == "jumprelu"
    x = activations()
    for got, ref in zip(outputs(loaded, x), outputs(items[0].sae, x)):  # dense vs sparse decode: float order
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_training_normalisation_is_folded(tmp_path):
    items = layer_items("jumprelu", skip=True, n=1)
    gen = torch.Generator().manual_seed(3)
    mu_x, mu_y = torch.randn(D, generator=gen), torch.randn(D, generator=gen)
    items[0].meta = {"normalization": {"x": {"mode": "center_scale", "scale": 1.7, "mean": mu_x.tolist()},
                                       "y": {"mode": "center_scale", "scale": 0.6, "mean": mu_y.tolist()}}}
    export_items(items, tmp_path / "ct", "circuit-tracer")
    raw = activations()
    codes, recon = outputs(items[0].sae, (raw - mu_x) * 1.7)  # as trained: normalised in, normalised out
    got_codes, got_recon = outputs(load_pretrained(tmp_path / "ct"), raw)
    torch.testing.assert_close(got_codes, codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_recon, recon / 0.6 + mu_y, rtol=1e-5, atol=1e-5)


def test_a_smaller_export_leaves_no_stale_layer(tmp_path):
    export_items(layer_items(n=3), tmp_path / "ct", "circuit-tracer")
    export_items(layer_items(n=2), tmp_path / "ct", "circuit-tracer", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "ct").glob("layer_*")) == ["layer_0.safetensors", "layer_1.safetensors"]


def test_cli_exports_one_set_from_several_training_folders(tmp_path, capsys):
    items = layer_items()
    for i, item in enumerate(items):
        save_sae(item.sae, tmp_path / f"run{i}" / "final" / "tc", data={
            "source": "buffer", "hookpoint": f"layers.{i}.mlp_in", "target_hookpoint": f"layers.{i}.mlp"})
    export_main([str(tmp_path / f"run{i}") for i in range(N_LAYERS)] + [str(tmp_path / "out"), "--format",
                                                                       "circuit-tracer", "--model-name", "gpt2"])
    assert capsys.readouterr().out.count("(circuit-tracer)") == N_LAYERS
    x = activations()
    for i, item in enumerate(items):
        got = load_pretrained(tmp_path / "out", hookpoint=f"layers.{i}.mlp_in")
        torch.testing.assert_close(outputs(got, x)[1], outputs(item.sae, x)[1], rtol=0, atol=1e-6)
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: circuit-tracer\n") and "load_transcoder_set" in card
    with pytest.raises(ValueError, match="export to a folder outside it"):  # the old refusal, for any source
        export_checkpoint([tmp_path / "run0", tmp_path / "run1"], tmp_path / "run1" / "x", "circuit-tracer")


# --- refusals ---------------------------------------------------------------------------------------
def _with(items, i, **changes):
    for k, v in changes.items():
        setattr(items[i], k, v)
    return items


@pytest.mark.parametrize("case,match", [
    ("topk", r"tc0: circuit-tracer's transcoders are ReLU or JumpReLU .* this one is TopK; train sae=batchtopk"),
    ("sae", r"tc0: circuit-tracer loads transcoders .* this is an SAE \(sae.transcode=false\); export it with"),
    ("widths", r"tc0: .* maps d_in=12 to d_out=10; export it with --format saelens"),
    ("hooks", r"tc1: .* must read layers.N.mlp_in and reconstruct layers.N.mlp; this one reads 'layers.1' and "
              r"reconstructs 'layers.2' \(train it with data.hookpoint=layers.N.mlp_in"),
    ("missing", r"every layer 0..2, and layers 1 have none; export them together \(sae-export RUN_0 RUN_1"),
    ("twice", r"tc0 and tc1 both transcode layer 0; .* export one of them"),
    ("sizes", r"share one width: tc0 has d_in=12, 48 latents, tc2 d_in=12, 24"),
    ("skip", r"all have a skip connection or none do: tc1 and tc0 differ"),
    ("untrained_batchtopk", r"no inference threshold yet .* train it for at least one step"),
])
def test_what_circuit_tracer_cannot_load_is_refused_before_writing(tmp_path, case, match):
    items = layer_items()
    if case == "topk":
        items[0].sae = make_sae("topk", True, False, D)
    elif case == "sae":
        items[0].sae = make_sae("relu")
    elif case == "widths":
        items[0].sae = make_sae("relu", True, False, 10)
    elif case == "hooks":
        _with(items, 1, hookpoint="layers.1", target_hookpoint="layers.2")
    elif case == "missing":
        items.pop(1)
    elif case == "twice":
        _with(items, 1, hookpoint="layers.0.mlp_in", target_hookpoint="layers.0.mlp")
    elif case == "sizes":
        items[2].sae = build_sae(SAEConfig(architecture="jumprelu", num_latents=24, k=4, transcode=True), D, D)
    elif case == "skip":
        items[1].sae = make_sae("jumprelu", True, True, D)
    elif case == "untrained_batchtopk":
        items[0].sae = make_sae("batchtopk", True, False, D)
        items[0].sae.threshold.fill_(-1.0)
    with pytest.raises(ValueError, match=match):
        export_items(items, tmp_path / "ct", "circuit-tracer")
    assert not (tmp_path / "ct").exists()


def test_cli_refusal_is_one_line(tmp_path):
    save_sae(make_sae("topk", True, False, D), tmp_path / "src", data={
        "source": "buffer", "hookpoint": "layers.0.mlp_in", "target_hookpoint": "layers.0.mlp"})
    with pytest.raises(SystemExit) as err:
        export_main([str(tmp_path / "src"), str(tmp_path / "out"), "--format", "circuit-tracer"])
    msg = str(err.value)
    assert msg.startswith("sae-export: error: src: circuit-tracer's transcoders are ReLU or JumpReLU")
    assert "\n" not in msg


# --- cross-layer transcoder --------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["jumprelu", "batchtopk"])
def test_clt_files_and_round_trip(tmp_path, activation):
    clt = make_clt(activation)
    meta = {"clt": {"layers": [0, 1, 2], "d_model": M, "inputs": [f"layers.{i}.mlp_in" for i in range(3)],
                    "targets": [f"layers.{i}.mlp" for i in range(3)]}}
    export_items([clt_item(clt, **meta)], tmp_path / "clt", "circuit-tracer")
    out = tmp_path / "clt"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "W_dec_0.safetensors", "W_dec_1.safetensors",
                                                     "W_dec_2.safetensors", "W_enc_0.safetensors",
                                                     "W_enc_1.safetensors", "W_enc_2.safetensors", "config.yaml"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["model_kind"], cfg["feature_input_hook"], cfg["feature_output_hook"]) == (
        "cross_layer_transcoder", "mlp.hook_in", "mlp.hook_out")
    for i in range(N_LAYERS):
        with safe_open(str(out / f"W_enc_{i}.safetensors"), framework="pt") as fh:
            assert {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()} == {
                f"W_enc_{i}": (LP, M), f"b_enc_{i}": (LP,), f"b_dec_{i}": (M,), f"threshold_{i}": (LP,)}
        with safe_open(str(out / f"W_dec_{i}.safetensors"), framework="pt") as fh:
            assert {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()} == {f"W_dec_{i}": (LP, N_LAYERS - i, M)}
    loaded = load_pretrained_with_info(out)
    assert loaded.format == "circuit-tracer" and loaded.sae.architecture == "clt"
    assert loaded.sae.activation == "jumprelu" and loaded.sae.n_layers == N_LAYERS and loaded.name == "clt"
    xs = layer_x()
    codes, recon = clt_outputs(clt, xs)
    got_codes, got_recon = clt_outputs(loaded.sae, xs)
    assert any(bool((c > 0).any()) for c in codes) and any(bool((c == 0).any()) for c in codes)
    for a, b in zip(got_codes + got_recon, codes + recon):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def per_layer_normalization(seed: int = 5) -> tuple[dict, list, list]:
    """cfg.json's ``normalization.per_layer`` with a different centre and scale per layer, and the maps."""
    gen = torch.Generator().manual_seed(seed)
    xs = [(0.5 + i, torch.randn(M, generator=gen)) for i in range(N_LAYERS)]
    ys = [(30.0 * (i + 1), 0.01 * torch.randn(M, generator=gen)) for i in range(N_LAYERS)]
    entry = [{"x": {"mode": "center_scale", "scale": sx, "mean": mx.tolist()},
              "y": {"mode": "center_scale", "scale": sy, "mean": my.tolist()}} for (sx, mx), (sy, my) in zip(xs, ys)]
    return {"per_layer": entry}, xs, ys


@pytest.mark.parametrize("acausal", [False, True])
def test_a_clt_per_layer_normalisation_folds_into_its_weights(tmp_path, acausal):
    """A CLT trains on rows normalised layer by layer (data.normalize=auto): folded, it maps raw rows
    to what it computed on the normalised rows, mapped back; the circuit-tracer export is folded."""
    from sae.export.fold import fold_normalization

    clt = make_clt(clt_acausal=acausal)
    norm, xmaps, ymaps = per_layer_normalization()
    raw = layer_x()
    normed = [(x - mx) * sx for x, (sx, mx) in zip(raw, xmaps)]
    codes, recon = clt_outputs(clt, normed)
    want = [r / sy + my for r, (sy, my) in zip(recon, ymaps)]
    folded = fold_normalization(clt, norm)
    got_codes, got_recon = clt_outputs(folded, raw)
    assert any(bool((c > 0).any()) for c in codes)
    for a, b in zip(got_codes + got_recon, codes + want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(p, q) for p, q in zip(clt.state_dict().values(), make_clt(clt_acausal=acausal)
                                                 .state_dict().values()))  # the original is untouched
    if not acausal:  # circuit-tracer's CLT is causal
        export_items([clt_item(clt, normalization=norm)], tmp_path / "ct", "circuit-tracer")
        back_codes, back_recon = clt_outputs(load_pretrained(tmp_path / "ct"), raw)
        for a, b in zip(back_codes + back_recon, codes + want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    bad = {"per_layer": norm["per_layer"][:2]}
    with pytest.raises(ValueError, match="normalisation for 2 input and 2 target layers, but the CLT has 3"):
        fold_normalization(clt, bad)
    with pytest.raises(ValueError, match=r"normalization.per_layer\[1\].y.scale=-1.0 must be a positive number"):
        fold_normalization(clt, {"per_layer": [e if i != 1 else {**e, "y": {**e["y"], "scale": -1.0}}
                                               for i, e in enumerate(norm["per_layer"])]})
    with pytest.raises(ValueError, match="per-layer normalisation for a 'jumprelu' SAE, which has one layer"):
        fold_normalization(layer_items(n=1)[0].sae, norm)


def test_cli_exports_a_trained_clt(tmp_path, capsys):
    clt = make_clt()
    rec = {"layers": [0, 1, 2], "d_model": M, "inputs": [f"layers.{i}.mlp_in" for i in range(N_LAYERS)],
           "targets": [f"layers.{i}.mlp" for i in range(N_LAYERS)]}
    save_sae(clt, tmp_path / "run" / "final" / "clt", data={"source": "buffer", "normalize": "none"}, clt=rec)
    export_main([str(tmp_path / "run"), str(tmp_path / "out"), "--format", "circuit-tracer", "--model-name", "gpt2"])
    assert capsys.readouterr().out.strip().endswith("out (circuit-tracer)")
    back = load_pretrained(tmp_path / "out")
    xs = layer_x()
    for a, b in zip(sum(clt_outputs(back, xs), []), sum(clt_outputs(clt, xs), [])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert "load_clt(" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("case,match", [
    ("acausal", r"clt: circuit-tracer's CLT is causal .* acausal crosscoder \(sae.clt_acausal=true\); export it"),
    ("topk", r"clt: circuit-tracer's CLT is ReLU or JumpReLU \(no TopK\), and this one is TopK"),
    ("layers", r"covers the model's layers from 0 .* reads \['layers.2.mlp_in', 'layers.3.mlp_in', "
               r"'layers.4.mlp_in'\]"),
    ("with_others", r"one cross-layer transcoder or one set of per-layer transcoders; got 2 coders"),
    ("sae", r"reconstructs its own input \(sae.transcode=false\)"),
])
def test_what_circuit_tracer_cannot_load_as_a_clt_is_refused(tmp_path, case, match):
    items = [clt_item(make_clt())]
    if case == "acausal":
        items[0].sae = make_clt(clt_acausal=True)
    elif case == "topk":
        items[0].sae = make_clt("topk")
    elif case == "layers":
        items[0].meta = {"clt": {"inputs": [f"layers.{i}.mlp_in" for i in (2, 3, 4)],
                                 "targets": [f"layers.{i}.mlp" for i in (2, 3, 4)]}}
    elif case == "with_others":
        items += layer_items(n=1)
    elif case == "sae":
        cfg = SAEConfig(architecture="clt", clt_layers=N_LAYERS, num_latents=LP, k=3, clt_activation="jumprelu")
        items[0].sae = build_sae(cfg, N_LAYERS * M)
    with pytest.raises(ValueError, match=match):
        export_items(items, tmp_path / "ct", "circuit-tracer")
    assert not (tmp_path / "ct").exists()


def test_load_pretrained_fetches_one_layer_of_a_hub_set(tmp_path):
    import subprocess
    import sys

    from fake_hub import FakeHub
    from safetensors.torch import load_file
    from test_export_hub import hub_env

    items = layer_items("jumprelu", skip=True)
    export_items(items, tmp_path / "set", "circuit-tracer")
    export_items([clt_item(make_clt())], tmp_path / "clt", "circuit-tracer")
    code = ("import sys; from safetensors.torch import save_file\n"
            "from sae.export import load_pretrained_with_info\n"
            "p = load_pretrained_with_info('me/set', hookpoint='layers.1.mlp_in')\n"
            "c = load_pretrained_with_info('me/clt')\n"
            "print(p.format, p.hookpoint, p.target_hookpoint, c.sae.architecture)\n"
            "save_file({k: v.contiguous() for k, v in p.sae.state_dict().items()}, sys.argv[1])")
    with FakeHub() as hub:
        hub.seed("me/set", tmp_path / "set")
        hub.seed("me/clt", tmp_path / "clt")
        got = subprocess.run([sys.executable, "-c", code, str(tmp_path / "got.safetensors")],
                             env=hub_env(tmp_path, hub.url), capture_output=True, text=True, timeout=300)
        assert got.returncode == 0, got.stderr
        fetched = {r.path.rsplit("/", 1)[-1] for r in hub.calls("GET", r"/resolve/")}
    assert got.stdout.split() == ["circuit-tracer", "layers.1.mlp_in", "layers.1.mlp", "clt"]
    assert "layer_1.safetensors" in fetched and not {"layer_0.safetensors", "layer_2.safetensors"} & fetched
    state = load_file(str(tmp_path / "got.safetensors"))
    torch.testing.assert_close(state["W_skip"], items[1].sae.W_skip.detach(), rtol=0, atol=0)
    torch.testing.assert_close(state["log_threshold"], items[1].sae.log_threshold.detach(), rtol=0, atol=1e-6)


# --- circuit-tracer itself (in .venv-peers) ------------------------------------------------------------
B = 40
# name -> (kind, per-layer architecture, skip) of our exports loaded by circuit-tracer
PEER_CASES = {"set_jumprelu_skip": ("set", "jumprelu", True), "set_relu": ("set", "relu", False),
              "clt_jumprelu": ("clt", "jumprelu", False)}
PEER_CLASS = {"set": ("TranscoderSet", "JumpReLU"), "clt": ("CrossLayerTranscoder", "JumpReLU")}


@torch.no_grad()
def our_outputs(kind: str, models, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What circuit-tracer computes, by our classes: codes [N, B, L], recon [N, B, D], and the
    reconstruction from codes with position 0 zeroed (its attribution path)."""
    if kind == "clt":
        codes = models.encode_layers(list(x))
        zeroed = [c.clone().index_fill_(0, torch.tensor([0]), 0.0) for c in codes]
        return {"codes": torch.stack(codes), "recon": torch.stack(models.decode_layers(codes)),
                "attr_recon": torch.stack(models.decode_layers(zeroed))}
    codes = [outputs(m, xi)[0] for m, xi in zip(models, x)]
    zeroed = [c.clone().index_fill_(0, torch.tensor([0]), 0.0) for c in codes]
    return {"codes": torch.stack(codes),
            "recon": torch.stack([m.reconstruct(xi, c) for m, xi, c in zip(models, x, codes)]),
            "attr_recon": torch.stack([m.reconstruct(xi, c) for m, xi, c in zip(models, x, zeroed)])}


@pytest.fixture(scope="module")
def ct_peers(tmp_path_factory):
    """Export ours, run peer_circuit_tracer.py once in .venv-peers, return (folder, report, our outputs)."""
    import json
    import os
    import subprocess
    from pathlib import Path

    from fake_hub import FakeHub
    from safetensors.torch import save_file
    from test_peers import peers_python

    py = peers_python()
    tmp = tmp_path_factory.mktemp("ct_peers")
    job: dict[str, list] = {"load": [], "save": []}
    ours = {}
    for name, (kind, arch, skip) in PEER_CASES.items():
        if kind == "clt":
            models, x = make_clt(arch), torch.stack(layer_x(B))
            export_items([clt_item(models)], tmp / name, "circuit-tracer")
        else:
            items = layer_items(arch, skip)
            models, x = [i.sae for i in items], activations(N_LAYERS * B).view(N_LAYERS, B, D)
            export_items(items, tmp / name, "circuit-tracer")
        ours[name] = our_outputs(kind, models, x)
        save_file({"x": x.contiguous()}, str(tmp / f"x_{name}.safetensors"))
        job["load"].append({"folder": str(tmp / name), "ref": str(tmp / f"x_{name}.safetensors"),
                            "out": str(tmp / f"got_{name}.safetensors")})
    for name in ("set_jumprelu_skip", "clt_jumprelu"):  # the Hub layout, through circuit-tracer's Hub loader
        job["load"].append({"repo": f"me/{name}", "ref": str(tmp / f"x_{name}.safetensors"),
                            "out": str(tmp / f"got_hub_{name}.safetensors")})
    for i, kind in enumerate(("set", "clt")):
        job["save"].append({"kind": kind, "folder": str(tmp / "theirs" / kind), "out": str(tmp / f"theirs_{kind}.st"),
                            "n_layers": N_LAYERS, "d_model": M, "d_transcoder": LP, "seed": 20 + i})
    (tmp / "job.json").write_text(json.dumps(job))
    with FakeHub() as hub:
        for name in ("set_jumprelu_skip", "clt_jumprelu"):
            hub.seed(f"me/{name}", tmp / name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp / "hf_home"),
                   HF_HUB_DISABLE_TELEMETRY="1", CIRCUIT_TRACER_CACHE_DIR=str(tmp / "ct_cache"))
        script = Path(__file__).with_name("peer_circuit_tracer.py")
        done = subprocess.run([str(py), str(script), str(tmp / "job.json")], env=env, capture_output=True, text=True,
                              timeout=600, cwd=tmp)
    assert done.returncode == 0, f"peer_circuit_tracer.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if "unavailable" in report:
        pytest.skip(f"circuit-tracer is not installed in {py} ({report['unavailable']}): re-run "
                    "`bash launch/peers_env.sh`")
    assert report["versions"]["circuit_tracer"] == ct.FORMAT_VERSION
    return tmp, report, ours


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    codes = want["codes"]
    assert (codes > 0).any() and (codes == 0).any()
    assert torch.equal(got["codes"] > 0, codes > 0), "different latents fire"
    for key in ("codes", "recon", "attr_recon"):
        assert got[key].shape == want[key].shape, key
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.peers
@pytest.mark.parametrize("name", list(PEER_CASES))
def test_circuit_tracer_loads_our_export_with_equal_outputs(ct_peers, name):
    from safetensors.torch import load_file

    tmp, report, ours = ct_peers
    info = report["load"][list(PEER_CASES).index(name)]
    kind, arch, skip = PEER_CASES[name]
    assert (info["class"], info["activation"]) == (PEER_CLASS[kind][0], "JumpReLU" if arch == "jumprelu" else "relu")
    assert (info["n_layers"], info["skip"]) == (N_LAYERS, skip)
    assert (info["feature_input_hook"], info["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    assert info["model_name"] == "EleutherAI/pythia-70m"
    assert_same(load_file(str(tmp / f"got_{name}.safetensors")), ours[name])


@pytest.mark.peers
@pytest.mark.parametrize("name", ["set_jumprelu_skip", "clt_jumprelu"])
def test_circuit_tracer_loads_our_export_from_the_hub(ct_peers, name):
    from safetensors.torch import load_file

    tmp, _, ours = ct_peers
    assert_same(load_file(str(tmp / f"got_hub_{name}.safetensors")), ours[name])


@pytest.mark.peers
@pytest.mark.parametrize("kind", ["set", "clt"])
def test_we_load_what_circuit_tracer_saves(ct_peers, kind):
    from safetensors.torch import load_file

    tmp, _, _ = ct_peers
    theirs = load_file(str(tmp / f"theirs_{kind}.st"))
    folder = tmp / "theirs" / kind  # to_safetensors writes no config.yaml: found by its files
    if kind == "clt":
        models = load_pretrained(folder)
        assert models.architecture == "clt" and models.activation == "jumprelu"
    else:
        models = [load_pretrained(folder, hookpoint=f"layer_{i}") for i in range(N_LAYERS)]
        assert all(m.architecture == "jumprelu" and m.W_skip is not None for m in models)
    assert_same(theirs, our_outputs(kind, models, theirs["x"]))


def test_a_config_listing_remote_transcoders_says_the_layout_is_not_read(tmp_path):
    """circuit-tracer Hub repos such as gemma-scope-transcoders list hf:// URIs instead of files."""
    (tmp_path / "config.yaml").write_text("model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
                                          "feature_output_hook: mlp.hook_out\nscan: s\n"
                                          "transcoders:\n  - hf://me/tc/layer_0.safetensors\n")
    from sae.export.circuit_tracer import read_circuit_tracer

    with pytest.raises(ValueError, match="lists its transcoders as URIs .* not read here"):
        read_circuit_tracer(tmp_path)
