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

import html
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.eval.splice import _first, _with_first, resolve_site
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
        return out

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
            handle = module.register_forward_hook(lambda mod, args, out: _with_first(out, self._edit(_first(out))))
        try:
            yield self
        finally:
            handle.remove()


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int, steering: Steering | None = None) -> str:
    """Greedy continuation of ``prompt`` (without the prompt), steered while ``steering`` is given."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False,
                          "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else tokenizer.eos_token_id}
    if steering is None:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    else:
        with steering.applied():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def steer_prompts(model, tokenizer, sae: SparseCoder, hookpoint: str, prompts: list[str],
                  interventions: list[Intervention], max_new_tokens: int = 40) -> list[dict[str, Any]]:
    """For each prompt, the baseline and the steered greedy completions."""
    steering = Steering(model, sae, hookpoint, interventions)
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
        f"<tr><td class=p>{html.escape(r['prompt'])}</td><td>{html.escape(r['baseline'])}</td>"
        f"<td>{html.escape(r['steered'])}</td></tr>" for r in rows)
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:24px;max-width:1150px}table{border-collapse:collapse;width:100%}"
            "td,th{border:1px solid #ccc;padding:6px 8px;vertical-align:top;white-space:pre-wrap}"
            "th{background:#f3f3f3}.p{color:#555}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(desc)}</p>"
            "<table><tr><th>prompt</th><th>baseline</th><th>steered</th></tr>" + cells + "</table></body></html>")
    page_path = out / "steering.html"
    page_path.write_text(page, encoding="utf-8")
    return jsonl, page_path
