"""The EleutherAI sparsify format (``sparsify.SparseCoder.load_from_disk`` / ``load_from_hub`` / ``load_many``).

One folder per hook point holding ``cfg.json`` (sparsify's ``SparseCoderConfig`` fields plus
``d_in``) and ``sae.safetensors`` with ``encoder.weight`` [L, D], ``encoder.bias`` [L], ``W_dec``
[L, D], ``b_dec`` [D] and, for skip transcoders, ``W_skip`` [D, D]. Read from sparsify 1.3.3's
``load_from_disk``: the tensor set must match exactly (``safetensors.torch.load_model``, strict).

sparsify computes z = TopK(ReLU(W_enc (x - b_dec) + b_enc)) (no ``b_dec`` subtraction for
transcoders), the same map as our TopK family, so weights carry over unchanged; activation
normalisation is folded in (:mod:`.fold`). It knows only TopK (and GroupMax) sparse coders whose
output width equals the input width: other architectures are an error naming the alternative.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from sae.models import SAEConfig, SparseCoder, build_sae
from sae.models.weights import check_shapes
from sae.train.artifact import save_weights

from .fold import fold_normalization
from .item import ExportItem
from .saelens import saelens_architecture

WEIGHTS = "sae.safetensors"
CFG = "cfg.json"
FILES = (WEIGHTS, CFG)
#: The sparsify release whose loader this format was checked against (tests/export/test_peers.py).
FORMAT_VERSION = "1.3.3"


def _alternatives(sae: SparseCoder) -> str:
    """The other formats that represent ``sae``, as the fix of a refusal."""
    if sae.cross_layer:
        return "use --format circuit-tracer or --format ours"
    try:
        saelens_architecture(sae)
    except ValueError:
        return "use --format ours"
    return "use --format saelens (ReLU, JumpReLU, BatchTopK, Gated) or --format ours"


def check_exportable(sae: SparseCoder) -> None:
    """Raise ``ValueError`` when sparsify cannot represent ``sae``."""
    if sae.export_form != "topk":  # TopK, or a family that is TopK at inference (Matryoshka TopK)
        raise ValueError(f"sparsify loads TopK sparse coders only, not {sae.architecture!r}; {_alternatives(sae)}")
    if sae.d_out != sae.d_in:
        raise ValueError(f"sparsify transcoders map a width to itself; this one maps d_in={sae.d_in} to "
                         f"d_out={sae.d_out}: use --format ours")


def write_sparsify(item: ExportItem, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write ``item`` in the sparsify format into ``folder`` (created)."""
    check_exportable(item.sae)
    sae = fold_normalization(item.sae, item.meta.get("normalization"))
    tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.W_skip is not None:
        tensors["W_skip"] = sae.W_skip
    expansion = sae.num_latents // sae.d_in if sae.num_latents % sae.d_in == 0 else 0
    cfg = {"activation": "topk", "expansion_factor": expansion, "normalize_decoder": sae.normalize_decoder,
           "num_latents": sae.num_latents, "k": sae.k, "multi_topk": False,
           "skip_connection": sae.W_skip is not None, "transcode": bool(sae.cfg.transcode), "d_in": sae.d_in}
    folder.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.detach().to(dtype).contiguous().cpu() for k, v in tensors.items()}, folder / WEIGHTS,
                 metadata={"format": "pt"})
    (folder / CFG).write_text(json.dumps(cfg, indent=2))


def read_sparsify(folder: Path) -> tuple[SparseCoder, dict[str, Any]]:
    """(SAE in our classes, sparsify cfg.json) of a sparsify folder.

    Raises:
        ValueError: GroupMax activation, a decoder-less checkpoint, or unexpected tensors.
    """
    cfg = json.loads((folder / CFG).read_text())
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{folder / CFG}: sparsify activation {cfg['activation']!r} has no equivalent here "
                         "(TopK only)")
    d_in = int(cfg["d_in"])
    L = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    check_shapes(folder / WEIGHTS, {"encoder.weight": (L, d_in), "W_dec": (L, d_in)},
                 f"{folder / CFG} (d_in={d_in}, num_latents={L})", exact_names=False)
    state = {k: v.float() for k, v in load_file(str(folder / WEIGHTS)).items()}
    if "W_dec" not in state:
        raise ValueError(f"{folder / WEIGHTS} has no W_dec (saved with decoder=False): it cannot reconstruct")
    skip, transcode = bool(cfg.get("skip_connection")), bool(cfg.get("transcode"))
    params = {"W_enc": state.pop("encoder.weight"), "b_enc": state.pop("encoder.bias"), "W_dec": state.pop("W_dec"),
              "b_dec": state.pop("b_dec")}
    if skip:
        params["W_skip"] = state.pop("W_skip")
        if not transcode:  # sparsify subtracts b_dec here; our skip coders are transcoders, which do not
            params["b_enc"] = params["b_enc"] - params["W_enc"] @ params["b_dec"]
    if state:
        raise ValueError(f"{folder / WEIGHTS}: tensors {sorted(state)} are not part of the sparsify format")
    sae_cfg = SAEConfig(architecture="topk", num_latents=L, k=int(cfg.get("k", 32)), transcode=transcode or skip,
                        skip_connection=skip, normalize_decoder=bool(cfg.get("normalize_decoder", True)))
    sae = build_sae(sae_cfg, d_in, d_in)
    sae.load_state_dict(params, strict=True)
    return sae, cfg
