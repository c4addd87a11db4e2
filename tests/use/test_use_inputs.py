"""Input validation of ``sae-steer`` / ``sae-attribute`` (sae/use/*.py) on the tiny GPT-2 of conftest.

Non-finite intervention values, latents outside the SAE, positions outside the prompt or past what
generation reaches, empty prompts, prompts longer than the model's 512 positions (with the exact
boundary), negative --top/--check/--max-new-tokens: each is one ``sae-...: error:`` line naming the
value and the fix, raised before the model runs (flags before anything loads). Steering whose
output turns NaN/Inf stops with the cause instead of printing ``steered: ''``; the HTML page shows
control characters as visible escapes.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sae.runners.use import attribute_main, reports_errors, steer_main
from sae.use.attribute import attribute
from sae.use.steer import Intervention, Steering, generate, steer_prompts, write_outputs

PROMPT = "Return the value of the object"
LIMIT = 512  # n_positions of the tiny GPT-2


def exit_line(run, *args) -> str:
    """The ``SystemExit`` message of ``run(args)``, checked to be one line."""
    with pytest.raises(SystemExit) as e:
        run(list(args))
    msg = str(e.value.code)
    assert "\n" not in msg, msg
    return msg


def test_non_finite_values_are_refused_naming_the_flag_value(steered_setup, tmp_path):
    model, tok, sae, folder = steered_setup
    for text, word in (("add:5:nan", "coefficient"), ("add:5:inf", "coefficient"), ("clamp:5:-inf@2", "value"),
                       ("clamp:5:NaN", "value")):
        value = text.split(":")[2].split("@")[0]
        with pytest.raises(ValueError, match=rf"intervention '{text}': '{value}' is not a finite number; give a "
                                             rf"finite {word}"):
            Intervention.parse(text)
    with pytest.raises(ValueError, match="add nan is not a finite number"):
        Steering(model, sae, "layers.0", [Intervention(3, "add", coefficient=float("nan"))])
    # Refused before the SAE or the model loads: a folder that does not exist is never reached.
    msg = exit_line(steer_main, "--sae", str(tmp_path / "absent"), "--prompt", PROMPT, "--intervene", "add:5:nan",
                    "--out", str(tmp_path / "out"))
    assert msg.startswith("sae-steer: error: intervention 'add:5:nan': 'nan' is not a finite number")
    assert not (tmp_path / "out").exists()


def test_latents_and_intervention_positions_outside_the_range_are_refused(steered_setup, tmp_path):
    model, tok, sae, folder = steered_setup
    n, T = sae.num_latents, len(tok(PROMPT).input_ids)
    msg = exit_line(steer_main, "--sae", str(folder), "--prompt", PROMPT, "--intervene", f"clamp:{n}:1", "--device",
                    "cpu", "--out", str(tmp_path / "a"))
    assert msg == f"sae-steer: error: latent {n} does not exist: the SAE has latents 0..{n - 1}"
    last = T + 6 - 2  # the 6th new token is predicted at position T + 4; the model never reads it
    msg = exit_line(steer_main, "--sae", str(folder), "--prompt", PROMPT, "--intervene", f"clamp:5:1@{last + 1}",
                    "--max-new-tokens", "6", "--device", "cpu", "--out", str(tmp_path / "b"))
    assert f"starts past the last position the model reads for prompt {PROMPT!r} ({T} tokens + 6 new: 0..{last}); " \
           f"use @0..@{last} or a larger --max-new-tokens" in msg
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # The bound is exact: generation reads positions 0..last, so @last is accepted.
    steering = Steering(model, sae, "layers.0", [Intervention(5, "clamp", value=1.0, from_position=last)])
    generate(model, tok, PROMPT, 6, steering)
    assert steering.position == last + 1
    assert len(steer_prompts(model, tok, sae, "layers.0", [PROMPT], steering.interventions, 6)) == 1


def test_steering_that_turns_the_output_non_finite_stops_with_the_cause(steered_setup, tmp_path):
    model, tok, sae, folder = steered_setup
    damaged = copy.deepcopy(sae)
    with torch.no_grad():
        damaged.W_dec[3] = float("nan")
    with pytest.raises(ValueError, match=r"steering made the activations at 'layers.0' NaN/Inf: the SAE's decoder "
                                         r"row W_dec\[3\] holds NaN/Inf"):
        steer_prompts(model, tok, damaged, "layers.0", [PROMPT], [Intervention(3, "add", coefficient=1.0)], 4)
    # Finite activations that the next layer turns into NaN logits: no empty completion, no NaN in a file.
    msg = exit_line(steer_main, "--sae", str(folder), "--prompt", PROMPT, "--intervene", "add:3:1e38",
                    "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "out"))
    assert msg.startswith(f"sae-steer: error: the steered model's next-token logits hold NaN/Inf for prompt {PROMPT!r}"
                          ": the interventions push the activations at 'layers.0' out of the model's range")
    assert not (tmp_path / "out").exists()


def test_empty_and_too_long_prompts(steered_setup, tmp_path):
    model, tok, sae, folder = steered_setup
    assert len(tok("x" * LIMIT).input_ids) == LIMIT  # one token per character
    common = ["--sae", str(folder), "--device", "cpu"]
    msg = exit_line(steer_main, *common, "--prompt", "", "--intervene", "add:3:1", "--out", str(tmp_path / "s"))
    assert msg == "sae-steer: error: prompt '' has no tokens; give a prompt of at least one token"
    msg = exit_line(attribute_main, *common, "--prompt", "", "--target", "#5")
    assert msg == "sae-attribute: error: prompt '' has no tokens; give a prompt of at least one token"
    # Generation reads the prompt and all new tokens but the last: T + new - 1 positions.
    ok = steer_prompts(model, tok, sae, "layers.0", ["x" * (LIMIT - 1)], [Intervention(3, "add", coefficient=1.0)], 2)
    assert len(ok) == 1
    with pytest.raises(ValueError, match=rf"prompt 'xxx.*' is {LIMIT - 1} tokens and 3 new tokens, past the {LIMIT} "
                                         r"positions of the model; shorten the prompt or lower --max-new-tokens "
                                         r"\(at most 2 for it\)"):
        steer_prompts(model, tok, sae, "layers.0", [PROMPT, "x" * (LIMIT - 1)],
                      [Intervention(3, "add", coefficient=1.0)], 3)
    assert attribute(model, tok, sae, "layers.0", "x" * LIMIT, 5).position == LIMIT - 1
    msg = exit_line(attribute_main, *common, "--prompt", "x" * (LIMIT + 1), "--target", "#5")
    assert msg.startswith("sae-attribute: error: prompt 'xxx") and msg.endswith(
        f"is {LIMIT + 1} tokens, past the {LIMIT} positions of the model; shorten the prompt")


def test_positions_outside_the_prompt(steered_setup):
    model, tok, sae, folder = steered_setup
    T = len(tok("hi there").input_ids)
    for position in (T, 99):
        msg = exit_line(attribute_main, "--sae", str(folder), "--device", "cpu", "--prompt", "hi there", "--target",
                        "#5", "--position", str(position))
        assert msg == (f"sae-attribute: error: --position {position} is past the prompt's {T} tokens; use 0..{T - 1}, "
                       "or -1 for the last")
    with pytest.raises(ValueError, match=rf"--position {-T - 1} is before the start of the prompt's {T} tokens"):
        attribute(model, tok, sae, "layers.0", "hi there", 5, position=-T - 1)
    assert attribute(model, tok, sae, "layers.0", "hi there", 5, position=-T).position == 0
    assert attribute(model, tok, sae, "layers.0", "hi there", 5, position=T - 1).position == T - 1


@pytest.mark.parametrize("flags,expected", [
    (["--top", "-3"], "--top -3 must be >= 1 (how many latents to list)"),
    (["--top", "0"], "--top 0 must be >= 1"),
    (["--check", "-1"], "--check -1: give 0 (no ablation check) or N >= 2"),
    (["--check", "1"], "--check 1: give 0 (no ablation check) or N >= 2"),
])
def test_count_flags_are_checked_before_anything_loads(tmp_path, flags, expected):
    msg = exit_line(attribute_main, "--sae", str(tmp_path / "absent"), "--prompt", "hi", "--target", "#5", *flags)
    assert msg.startswith(f"sae-attribute: error: {expected}")


def test_max_new_tokens_is_checked_before_anything_loads(tmp_path):
    msg = exit_line(steer_main, "--sae", str(tmp_path / "absent"), "--prompt", "hi", "--intervene", "add:3:1",
                    "--max-new-tokens", "0")
    assert msg == "sae-steer: error: --max-new-tokens 0 must be >= 1 (tokens generated per prompt)"


def test_unexpected_errors_are_one_line_unless_debugging(monkeypatch):
    monkeypatch.delenv("SAE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e, reports_errors("sae-steer"):
        raise RuntimeError("shape mismatch\nsecond line")
    assert e.value.code == ("sae-steer: error: shape mismatch second line (RuntimeError; set SAE_DEBUG=1 for the "
                            "traceback)")
    monkeypatch.setenv("SAE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="shape mismatch"), reports_errors("sae-steer"):
        raise RuntimeError("shape mismatch")


def test_steering_page_shows_control_characters_as_visible_escapes(tmp_path):
    rows = [{"prompt": "a\x00b", "baseline": "tab\there\nnext \x1b[31m", "steered": "\x7f\x01 <b>",
             "interventions": [{"mode": "add", "latent": 3, "coefficient": 1.0, "value": None, "from_position": 0}],
             "hookpoint": "layers.0"}]
    jsonl, page = write_outputs(rows, tmp_path, "t\x00itle")
    text = page.read_text(encoding="utf-8")
    assert not [c for c in text if (ord(c) < 32 and c not in "\t\n") or 0x7F <= ord(c) < 0xA0]
    for shown in ("a\u2400b", "tab\there\nnext \u241b[31m", "\u2421\u2401 &lt;b&gt;", "t\u2400itle"):
        assert shown in text
    assert json.loads(jsonl.read_text())["prompt"] == "a\x00b"  # the data keeps the exact text
