"""Hook point names -> modules of a real model (harvest stage).

Friendly names are the same for every supported family; ``N`` is the block index:

    layers.N          residual stream after block N (the block's output)
    layers.N.attn     attention sublayer output (before it is added to the residual)
    layers.N.mlp      MLP output (before it is added to the residual)
    layers.N.mlp_in   MLP input (what a transcoder reads; after the pre-MLP norm)

Families: GPT-2, Llama/Mistral/Qwen/Gemma-style, GPT-NeoX, BERT-style encoders; others get the
generic block detection below. Any module name of the model (``encoder.layer.3.output.dense``)
also works, as its output. Patterns are globs matched segment by segment (``*`` never crosses a
dot): ``layers.*`` is every residual point, ``layers.[0-2].mlp`` the first three MLPs.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

# family -> alias suffix -> (module path inside the block, "output" | "input")
_GPT2 = {"": ("", "output"), "attn": ("attn", "output"), "mlp": ("mlp", "output"), "mlp_in": ("mlp", "input")}
_LLAMA = {"": ("", "output"), "attn": ("self_attn", "output"), "mlp": ("mlp", "output"), "mlp_in": ("mlp", "input")}
_NEOX = {"": ("", "output"), "attn": ("attention", "output"), "mlp": ("mlp", "output"), "mlp_in": ("mlp", "input")}
# BERT is post-norm: the MLP is intermediate (up + act) then output.dense (down), and the
# attention contribution is attention.output.dense, each before its residual add and LayerNorm.
_BERT = {"": ("", "output"), "attn": ("attention.output.dense", "output"), "mlp": ("output.dense", "output"),
         "mlp_in": ("intermediate", "input")}
FAMILIES = {
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
    **{t: _LLAMA for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "phi3")},
    **{t: _BERT for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
}
_GENERIC_SUB = {"attn": ("self_attn", "attn", "attention"), "mlp": ("mlp", "feed_forward", "ffn")}


@dataclass(frozen=True)
class HookPoint:
    name: str
    """Name written in the manifest: the alias (``layers.3``) or the module path."""
    module: str
    """Module path in the model (``encoder.layer.3``)."""
    kind: str
    """``output``: the module's output (first element of a tuple); ``input``: its first input."""


def find_blocks(model: nn.Module) -> str | None:
    """Path of the transformer block list: the shallowest ``ModuleList``, the longest among equals.

    Shallowest first so that per-block lists (MoE experts, deeper down) never win.
    """
    lists = [(name.count("."), -len(mod), name) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    return min(lists)[2] if lists else None


def _generic_family(model: nn.Module, blocks: str) -> dict[str, tuple[str, str]]:
    modules = dict(model.named_modules())
    first = f"{blocks}.0"
    family = {"": ("", "output")}
    for alias, candidates in _GENERIC_SUB.items():
        for c in candidates:
            if f"{first}.{c}" in modules:
                family[alias] = (c, "output")
                if alias == "mlp":
                    family["mlp_in"] = (c, "input")
                break
    return family


def alias_table(model: nn.Module) -> dict[str, HookPoint]:
    """The friendly names (``layers.N[.attn|.mlp|.mlp_in]``) this model supports, in block order."""
    modules = dict(model.named_modules())
    table: dict[str, HookPoint] = {}
    blocks = find_blocks(model)
    if blocks is not None:
        model_type = getattr(getattr(model, "config", None), "model_type", "")
        family = FAMILIES.get(model_type) or _generic_family(model, blocks)
        for i in range(len(modules[blocks])):
            for suffix, (rel, kind) in family.items():
                path = f"{blocks}.{i}" + (f".{rel}" if rel else "")
                if path in modules:
                    alias = f"layers.{i}" + (f".{suffix}" if suffix else "")
                    table[alias] = HookPoint(alias, path, kind)
    return table


def hookpoint_table(model: nn.Module) -> dict[str, HookPoint]:
    """Every name a pattern can match: aliases first, then the other module names (as outputs)."""
    table = alias_table(model)
    for name, _ in model.named_modules():
        if name and name not in table:
            table[name] = HookPoint(name, name, "output")
    return table


def _matches(pattern: str, name: str) -> bool:
    p, n = pattern.split("."), name.split(".")
    return len(p) == len(n) and all(fnmatchcase(b, a) for a, b in zip(p, n))


def _natural_key(name: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def resolve_hookpoints(model: nn.Module, patterns: list[str]) -> list[HookPoint]:
    """Expand ``patterns`` against the model; keep pattern order, drop duplicates.

    A pattern starting with the model's ``base_model_prefix`` (``transformer.h.3`` for a GPT-2
    base model) also matches without it.

    Raises:
        ValueError: no patterns, or a pattern that matches nothing (close matches are listed).
    """
    if not patterns:
        raise ValueError("no hook points given; e.g. hookpoints=[layers.3]")
    aliases = alias_table(model)
    table = hookpoint_table(model)
    raw = [n for n in table if n not in aliases]
    prefix = getattr(model, "base_model_prefix", "")
    out: dict[tuple[str, str], HookPoint] = {}
    for pattern in patterns:
        candidates = [pattern]
        if prefix and pattern.startswith(prefix + "."):
            candidates.append(pattern[len(prefix) + 1:])
        hits = []
        # Aliases shadow raw module names (Llama's raw "layers.1.mlp" is also an alias).
        for names in (aliases, raw):
            for cand in candidates:
                hits = sorted((n for n in names if _matches(cand, n)), key=_natural_key)
                if hits:
                    break
            if hits:
                break
        if not hits:
            raise ValueError(_unknown_message(pattern, table, list(aliases)))
        for name in hits:
            hp = table[name]
            out.setdefault((hp.module, hp.kind), hp)
    return list(out.values())


def _unknown_message(pattern: str, table: dict[str, HookPoint], aliases: list[str]) -> str:
    close = difflib.get_close_matches(pattern, list(table), n=5, cutoff=0.6)
    layers = sorted({int(n.split(".")[1]) for n in aliases})
    msg = f"hook point {pattern!r} not found"
    if layers:
        suffixes = sorted({n.split(".", 2)[2] for n in aliases if n.count(".") == 2})
        msg += f"; model has layers.{layers[0]}..layers.{layers[-1]} (suffixes: {', '.join('.' + s for s in suffixes)})"
    if close:
        msg += f"; close matches: {', '.join(close)}"
    return msg + ". Any module name of the model also works (see model.named_modules())"
