"""Steering a causal LM with SAE latents: add a latent's decoder direction, or clamp a latent.

At the SAE's hook point (the module output, or its input for ``*.mlp_in``-style points), for
positions ``>= from_position`` of each sequence:

    add:    x' = x + coefficient * W_dec[latent]
    clamp:  x' = x + decode(codes with latent := value) - decode(codes)
               = x + (value - a_latent(x)) * W_dec[latent]       (the decoder is linear in the codes)

so clamping keeps the SAE's error term ``x - decode(encode(x))`` untouched. ``value=None`` clamps
a latent to its own activation: a no-op through the whole machinery, the control of an
experiment. The SAE is used on the model's raw activations (``load_pretrained`` folds a recorded
training normalisation into its weights), and generation is greedy, one prompt at a time, with the
absolute position of each token tracked through the KV cache.

Sits downstream of models and harvest, upstream of nothing: ``sae-steer`` and the Python API.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.eval.report import escape
from sae.eval.splice import first_tensor, resolve_site, with_first
from sae.models import SparseCoder, SparseCodes

MODES = ("add", "clamp")


@dataclass
class Intervention:
    """One change at the SAE's hook point (see the module docstring)."""

    latent: int
    mode: str = "add"
    coefficient: float = 0.0
    """add: the multiple of ``W_dec[latent]`` added."""
    value: float | None = None
    """clamp: the activation the latent is set to (None: its own; a no-op)."""
    from_position: int = 0
    """Only positions >= this (0: every position, prompt and generated tokens)."""

    @classmethod
    def parse(cls, text: str) -> Intervention:
        """``add:LATENT:COEF[@POS]`` or ``clamp:LATENT:VALUE[@POS]`` (``VALUE`` may be ``own``)."""
        spec, _, pos = text.partition("@")
        parts = spec.split(":")
        if len(parts) != 3 or parts[0] not in MODES:
            raise ValueError(f"intervention {text!r}: write add:LATENT:COEFFICIENT or clamp:LATENT:VALUE, optionally "
                             "followed by @POSITION (apply from that position on)")
        try:
            latent, number = int(parts[1]), None if parts[2] == "own" else float(parts[2])
            start = int(pos) if pos else 0
        except ValueError:
            raise ValueError(f"intervention {text!r}: LATENT and POSITION are integers, the last field a number"
                             f"{' or own' if parts[0] == 'clamp' else ''}") from None
        if number is not None and not math.isfinite(number):
            raise ValueError(f"intervention {text!r}: {parts[2]!r} is not a finite number; give a finite "
                             f"{'coefficient' if parts[0] == 'add' else 'value'} (e.g. {parts[0]}:{parts[1]}:8)")
        if parts[0] == "add":
            if number is None:
                raise ValueError(f"intervention {text!r}: add needs a coefficient")
            return cls(latent, "add", coefficient=number, from_position=start)
        return cls(latent, "clamp", value=number, from_position=start)


def latent_activation(sae: SparseCoder, x_ND: Tensor, latent: int) -> Tensor:
    """[N] activation of ``latent`` on rows ``x`` (0 where it is not active)."""
    codes = sae.encode(x_ND)
    if isinstance(codes, SparseCodes):
        return (codes.vals * (codes.idx == latent)).sum(-1)
    return codes[:, latent]


class Steering:
    """Hooks ``interventions`` into ``model`` at ``hookpoint`` while active (see :meth:`applied`).

    Raises:
        ValueError: a latent outside the SAE, a hook point the model lacks, a width that differs
            from the SAE's, an unknown mode.
    """

    def __init__(self, model: torch.nn.Module, sae: SparseCoder, hookpoint: str,
                 interventions: list[Intervention]):
        self.model, self.sae, self.interventions = model, sae, list(interventions)
        self.site = resolve_site(model, hookpoint)
        self.hookpoint = hookpoint
        for iv in self.interventions:
            if iv.mode not in MODES:
                raise ValueError(f"intervention mode {iv.mode!r}; use one of {', '.join(MODES)}")
            if not 0 <= iv.latent < sae.num_latents:
                raise ValueError(f"latent {iv.latent} does not exist: the SAE has latents 0..{sae.num_latents - 1}")
            if iv.from_position < 0:
                raise ValueError(f"from_position={iv.from_position} must be >= 0")
            number = iv.coefficient if iv.mode == "add" else iv.value
            if number is not None and not math.isfinite(number):
                raise ValueError(f"intervention on latent {iv.latent}: {iv.mode} {number} is not a finite number; "
                                 "give a finite coefficient or value")
        self.position = 0  # absolute position of the next token the model sees (KV cache)

    def _edit(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        if d != self.sae.d_out:
            raise ValueError(f"hook point {self.hookpoint!r} carries d={d} but the SAE reconstructs d="
                             f"{self.sae.d_out}; steer with an SAE trained on this hook point of this model")
        pos = torch.arange(self.position, self.position + T, device=x.device)
        self.position += T
        out = x
        rows = None
        for iv in self.interventions:
            where = (pos >= iv.from_position).to(x.dtype)[None, :, None]  # [1, T, 1]
            direction = self.sae.W_dec[iv.latent].to(x.device, x.dtype)
            if iv.mode == "add":
                if iv.coefficient == 0:
                    continue  # exactly nothing (not x + 0 * v, which turns -0.0 into 0.0)
                out = out + where * (iv.coefficient * direction)
                continue
            if rows is None:
                rows = x.reshape(B * T, d).float()
            with torch.no_grad():
                a = latent_activation(self.sae, rows.to(next(self.sae.parameters()).device), iv.latent)
            if iv.value is None:
                continue  # clamped to its own value: decode(clamped) - decode(codes) = 0
            delta = (iv.value - a).reshape(B, T, 1).to(x.device, x.dtype)
            out = out + where * delta * direction
        if not torch.isfinite(out).all():
            raise ValueError(f"steering made the activations at {self.hookpoint!r} NaN/Inf: {self._nonfinite_cause(x)}")
        return out

    def _nonfinite_cause(self, x: Tensor) -> str:
        if not torch.isfinite(x).all():
            return "the model's own activations hold NaN/Inf before any change; check the model and --dtype"
        for iv in self.interventions:
            if not torch.isfinite(self.sae.W_dec[iv.latent]).all():
                return (f"the SAE's decoder row W_dec[{iv.latent}] holds NaN/Inf; its weights are damaged: load a good "
                        "copy or retrain it")
        return (f"the SAE's encoder gives NaN/Inf, or the change overflows {x.dtype}; check the SAE's weights or use a "
                "smaller coefficient or value")

    @contextmanager
    def applied(self) -> Iterator[Steering]:
        """Register the hook for the duration; positions start at 0 (a fresh sequence)."""
        self.position = 0
        module = dict(self.model.named_modules())[self.site.module]
        if self.site.kind == "input":
            def pre(mod, args, kwargs):
                if args:
                    return (self._edit(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": self._edit(kwargs["hidden_states"])}
            handle = module.register_forward_pre_hook(pre, with_kwargs=True)
        else:
            handle = module.register_forward_hook(lambda mod, args, out: with_first(out, self._edit(first_tensor(out))))
        try:
            yield self
        finally:
            handle.remove()


def model_positions(model) -> int | None:
    """The most positions ``model`` embeds (its config's max_position_embeddings / n_positions), or None."""
    cfg = model.config
    return next((int(v) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                 if isinstance(v := getattr(cfg, k, None), int) and v > 0), None)


def _clip(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def prompt_ids(model, tokenizer, prompt: str, new_tokens: int = 0) -> Tensor:
    """[1, T] token ids of ``prompt`` on the model's device, checked to fit the model's positions with
    ``new_tokens`` generated after it (the last of which the model never reads).

    Raises:
        ValueError: an empty prompt, or one that (with the new tokens) runs past the model's positions.
    """
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    T = ids.shape[1]
    if T == 0:
        raise ValueError(f"prompt {prompt!r} has no tokens; give a prompt of at least one token")
    limit = model_positions(model)
    if limit is not None and T + max(new_tokens - 1, 0) > limit:
        more = f" and {new_tokens} new tokens" if new_tokens else ""
        fix = f" or lower --max-new-tokens (at most {limit + 1 - T} for it)" if new_tokens and T < limit else ""
        raise ValueError(f"prompt {_clip(prompt)} is {T} tokens{more}, past the {limit} positions of the model; "
                         f"shorten the prompt{fix}")
    return ids.to(next(model.parameters()).device)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int, steering: Steering | None = None) -> str:
    """Greedy continuation of ``prompt`` (without the prompt), steered while ``steering`` is given.

    Raises:
        ValueError: the prompt does not fit the model (:func:`prompt_ids`); the logits hold NaN/Inf.
    """
    ids = prompt_ids(model, tokenizer, prompt, max_new_tokens)
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "output_logits": True,
                          "return_dict_in_generate": True,
                          "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else tokenizer.eos_token_id}
    if steering is None:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    else:
        with steering.applied():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    if not all(torch.isfinite(step).all() for step in out.logits):
        which, cause = ("unsteered", "the model itself gives NaN/Inf; check the model and --dtype")
        if steering is not None:
            which, cause = "steered", (f"the interventions push the activations at {steering.hookpoint!r} out of the "
                                       "model's range; use a smaller coefficient or value")
        raise ValueError(f"the {which} model's next-token logits hold NaN/Inf for prompt {_clip(prompt)}: {cause}")
    return tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)


def check_reach(interventions: list[Intervention], prompt_tokens: int, max_new_tokens: int, prompt: str) -> None:
    """Refuse an intervention that starts past the last position the model reads for a prompt
    (``prompt_tokens + max_new_tokens - 2``): it would change nothing."""
    last = prompt_tokens + max_new_tokens - 2
    for iv in interventions:
        if iv.from_position > last:
            raise ValueError(f"intervention @{iv.from_position} ({describe(asdict(iv))}) starts past the last position "
                             f"the model reads for prompt {_clip(prompt)} ({prompt_tokens} tokens + {max_new_tokens} "
                             f"new: 0..{last}); use @0..@{last} or a larger --max-new-tokens")


def steer_prompts(model, tokenizer, sae: SparseCoder, hookpoint: str, prompts: list[str],
                  interventions: list[Intervention], max_new_tokens: int = 40) -> list[dict[str, Any]]:
    """For each prompt, the baseline and the steered greedy completions.

    Raises:
        ValueError: ``max_new_tokens < 1``, an empty or too long prompt, an intervention that reaches no
            position or is bad (:class:`Steering`): checked before anything is generated. NaN/Inf
            activations or logits while generating.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 (--max-new-tokens)")
    steering = Steering(model, sae, hookpoint, interventions)
    for p in prompts:
        check_reach(interventions, prompt_ids(model, tokenizer, p, max_new_tokens).shape[1], max_new_tokens, p)
    return [{"prompt": p, "baseline": generate(model, tokenizer, p, max_new_tokens),
             "steered": generate(model, tokenizer, p, max_new_tokens, steering),
             "interventions": [asdict(iv) for iv in interventions], "hookpoint": hookpoint} for p in prompts]


def describe(iv: dict[str, Any]) -> str:
    """One intervention (as a dict) in words."""
    if iv["mode"] == "add":
        what = f"add {iv['coefficient']:g} x latent {iv['latent']}"
    else:
        what = f"clamp latent {iv['latent']} to " + ("its own value" if iv["value"] is None else f"{iv['value']:g}")
    return what + (f" from position {iv['from_position']}" if iv["from_position"] else "")


def write_outputs(rows: list[dict[str, Any]], out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """``steering.jsonl`` (one row per prompt) and ``steering.html`` (baseline beside steered)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "steering.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    desc = "; ".join(describe(iv) for iv in (rows[0]["interventions"] if rows else []))
    cells = "".join(
        f"<tr><td class=p>{escape(r['prompt'])}</td><td>{escape(r['baseline'])}</td>"
        f"<td>{escape(r['steered'])}</td></tr>" for r in rows)
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:24px;max-width:1150px}table{border-collapse:collapse;width:100%}"
            "td,th{border:1px solid #ccc;padding:6px 8px;vertical-align:top;white-space:pre-wrap}"
            "th{background:#f3f3f3}.p{color:#555}</style></head><body>"
            f"<h1>{escape(title)}</h1><p>{escape(desc)}</p>"
            "<table><tr><th>prompt</th><th>baseline</th><th>steered</th></tr>" + cells + "</table></body></html>")
    page_path = out / "steering.html"
    page_path.write_text(page, encoding="utf-8")
    return jsonl, page_path
