"""Steering (sae/use/steer.py, ``sae-steer``) on a tiny random GPT-2 with a briefly trained SAE.

A coefficient of 0 and a clamp to the latent's own value leave the logits exactly unchanged; an
added direction changes the hook point's activations by exactly that vector (from the chosen
position on); a clamp moves the latent's activation to the value; bad latents, hook points and
widths are clear errors; the command writes JSONL and an HTML page with both completions.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from sae.eval.splice import first_tensor
from sae.use.steer import Intervention, Steering, latent_activation, steer_prompts, write_outputs

PROMPT = "Return the value of the object"


def logits(model, tok, steering=None):
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        if steering is None:
            return model(input_ids=ids).logits
        with steering.applied():
            return model(input_ids=ids).logits


def hook_output(model, tok, steering=None) -> torch.Tensor:
    """The hook point's output as the rest of the model sees it (after the steering hook)."""
    from sae.eval.splice import resolve_site

    seen = {}
    site = dict(model.named_modules())[resolve_site(model, "layers.0").module]
    with steering.applied() if steering is not None else contextlib.nullcontext():
        # Registered after the steering hook, so it sees the output the next block receives.
        handle = site.register_forward_hook(lambda m, a, o: seen.update(x=first_tensor(o).detach().clone()))
        try:
            logits(model, tok)
        finally:
            handle.remove()
    return seen["x"]


def test_zero_coefficient_and_own_value_clamp_change_nothing(steered_setup):
    model, tok, sae, _ = steered_setup
    clean = logits(model, tok)
    for iv in (Intervention(5, "add", coefficient=0.0), Intervention(5, "clamp", value=None),
               Intervention(7, "clamp", value=None, from_position=2)):
        assert torch.equal(logits(model, tok, Steering(model, sae, "layers.0", [iv])), clean), iv


def test_added_direction_moves_the_hook_activations_by_exactly_that_vector(steered_setup):
    model, tok, sae, _ = steered_setup
    base = hook_output(model, tok)
    steered = hook_output(model, tok, Steering(model, sae, "layers.0", [Intervention(3, "add", coefficient=2.5,
                                                                                          from_position=2)]))
    v = 2.5 * sae.W_dec[3].detach()
    assert torch.equal(steered[:, 2:], base[:, 2:] + v)
    assert torch.equal(steered[:, :2], base[:, :2])  # before from_position: untouched
    pushed = Steering(model, sae, "layers.0", [Intervention(3, "add", coefficient=2.5)])
    assert not torch.equal(logits(model, tok, pushed), logits(model, tok))


def test_clamp_sets_the_latent_and_keeps_the_error_term(steered_setup):
    model, tok, sae, _ = steered_setup
    base = hook_output(model, tok)[0]
    latent = int(sae.encode(base).idx[0, 0])  # active on the first token
    steered = hook_output(model, tok, Steering(model, sae, "layers.0", [Intervention(latent, "clamp", value=7.0)]))[0]
    expected = base + (7.0 - latent_activation(sae, base, latent))[:, None] * sae.W_dec[latent].detach()
    torch.testing.assert_close(steered, expected, rtol=0, atol=1e-6)


def test_bad_requests_are_clear_errors(steered_setup, tmp_path):
    model, tok, sae, _ = steered_setup
    n = sae.num_latents
    with pytest.raises(ValueError, match=f"latent {n} does not exist: the SAE has latents 0..{n - 1}"):
        Steering(model, sae, "layers.0", [Intervention(sae.num_latents, "add", coefficient=1.0)])
    with pytest.raises(ValueError, match="layers.9"):
        Steering(model, sae, "layers.9", [Intervention(1, "add", coefficient=1.0)])
    from sae.models import SAEConfig, build_sae

    wide = build_sae(SAEConfig(num_latents=64, k=4), 48)
    with pytest.raises(ValueError, match="hook point 'layers.0' carries d=32 but the SAE reconstructs d=48"):
        logits(model, tok, Steering(model, wide, "layers.0", [Intervention(1, "add", coefficient=1.0)]))
    for bad in ("add:3", "mult:3:1", "clamp:x:1", "add:3:own"):
        with pytest.raises(ValueError, match="intervention"):
            Intervention.parse(bad)
    assert Intervention.parse("clamp:4:own@3") == Intervention(4, "clamp", value=None, from_position=3)


def test_generation_outputs_and_command(steered_setup, tmp_path, capsys):
    model, tok, sae, folder = steered_setup
    rows = steer_prompts(model, tok, sae, "layers.0", [PROMPT, "If the module"],
                         [Intervention(3, "add", coefficient=40.0)], max_new_tokens=8)
    assert rows[0]["steered"] != rows[0]["baseline"]  # a large push changes the greedy continuation
    jsonl, page = write_outputs(rows, tmp_path / "out", "test")
    lines = [json.loads(ln) for ln in jsonl.read_text().splitlines()]
    assert [r["prompt"] for r in lines] == [PROMPT, "If the module"]
    text = page.read_text()
    assert "add 40 x latent 3" in text and all(r["baseline"].strip()[:5] in text for r in rows if r["baseline"].strip())

    from sae.runners.use import steer_main

    steer_main(["--sae", str(folder), "--prompt", PROMPT, "--intervene", "add:3:40", "--max-new-tokens", "6",
                "--out", str(tmp_path / "cli"), "--device", "cpu"])
    assert "steered:" in capsys.readouterr().out and (tmp_path / "cli" / "steering.html").is_file()
    with pytest.raises(SystemExit, match="sae-steer: error: latent 999 does not exist"):
        steer_main(["--sae", str(folder), "--prompt", PROMPT, "--intervene", "add:999:1", "--device", "cpu",
                    "--out", str(tmp_path / "cli2")])


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_steering_a_saelens_or_sparsify_export_matches_our_folder(steered_setup, tmp_path, capsys, fmt):
    from sae.export import export_checkpoint
    from sae.runners.use import steer_main

    model, tok, sae, folder = steered_setup
    export_checkpoint(folder, tmp_path / fmt, fmt, hookpoint="layers.0")
    args = ["--prompt", PROMPT, "--intervene", "add:3:40", "--intervene", "clamp:5:2@3", "--max-new-tokens", "6",
            "--device", "cpu"]
    steer_main(["--sae", str(folder), *args, "--out", str(tmp_path / "ours")])
    capsys.readouterr()
    # The export records no model (sparsify) or records it under its own names: name both.
    steer_main(["--sae", str(tmp_path / fmt / "layers.0"), "--model", str(model.name_or_path), "--hook", "layers.0",
                *args, "--out", str(tmp_path / "theirs")])
    ours, theirs = ((tmp_path / d / "steering.jsonl").read_text() for d in ("ours", "theirs"))
    assert json.loads(ours)["steered"] == json.loads(theirs)["steered"]
    assert json.loads(ours)["steered"] != json.loads(ours)["baseline"]
