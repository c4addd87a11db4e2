"""Runs inside .venv-peers (launch/peers_env.sh): SAELens and sparsify load our exports and save their own.

Usage: python peer_check.py JOB.json. It never imports sae-forge. For each entry of the job:

- ``load``: load an exported folder with the library's documented loader (``SAE.load_from_disk``,
  ``SAE.from_pretrained`` through ``HF_ENDPOINT``, ``Sae.load_from_disk``), encode and decode the
  reference inputs ``x`` of ``ref`` and write ``codes`` [B, L] and ``recon`` [B, E] to ``out``;
- ``save``: build a model of the library with random weights, save it with the library's own save
  function into ``folder``, load it back with the library's loader, and write ``x`` and its
  ``codes``/``recon`` to ``out``.

The calling test (test_peers.py) compares these outputs with ours.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder fails on CPU tensors

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def dense_topk(acts: torch.Tensor, idx: torch.Tensor, num_latents: int) -> torch.Tensor:
    return torch.zeros(acts.shape[0], num_latents).scatter_add_(1, idx.long(), acts.float())


@torch.no_grad()
def saelens_outputs(sae, x):
    codes = sae.encode(x)
    return codes, sae(x)  # forward: decode plus the skip path of skip transcoders


@torch.no_grad()
def sparsify_outputs(sae, x):
    out = sae.encode(x)
    recon = sae(x).sae_out  # forward: decode plus W_skip
    return dense_topk(out.top_acts, out.top_indices, sae.num_latents), recon


def load(entry):
    x = load_file(entry["ref"])["x"]
    if entry["lib"] == "saelens":
        from sae_lens import SAE

        if entry.get("repo"):
            sae = SAE.from_pretrained(entry["repo"], entry["sae_id"])
        else:
            sae = SAE.load_from_disk(entry["folder"])
        codes, recon = saelens_outputs(sae.eval(), x)
        info = {"class": type(sae).__name__, "architecture": sae.cfg.architecture()}
    else:
        from sparsify import Sae

        if entry.get("repo"):
            sae = Sae.load_from_hub(entry["repo"], hookpoint=entry["hookpoint"])
        else:
            sae = Sae.load_from_disk(entry["folder"])
        codes, recon = sparsify_outputs(sae, x)
        info = {"class": type(sae).__name__, "k": sae.cfg.k}
    save_file({"codes": codes.contiguous(), "recon": recon.contiguous()}, entry["out"])
    return info


def _perturb(model, gen, skip=()):
    for name, p in model.named_parameters():
        if name not in skip:
            p.data += 0.2 * torch.randn(p.shape, generator=gen)


def build_saelens(kind, d_in, d_sae, k, d_out, gen):
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    elif kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    elif kind == "skip_transcoder":
        sae = SkipTranscoder(SkipTranscoderConfig(d_in=d_in, d_sae=d_sae, d_out=d_out, apply_b_dec_to_input=False))
    elif kind == "batchtopk_training":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    elif kind == "gated":
        sae = GatedSAE(GatedSAEConfig(d_in=d_in, d_sae=d_sae))
    elif kind == "matryoshka_batchtopk_training":
        sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, k=k, matryoshka_widths=[d_sae // 4, d_sae]))
    else:
        raise ValueError(kind)
    _perturb(sae, gen, skip=("threshold",))
    if kind == "jumprelu":
        sae.threshold.data = torch.empty(d_sae).uniform_(0.05, 0.6, generator=gen)
    if kind in ("batchtopk_training", "matryoshka_batchtopk_training"):
        sae.topk_threshold = torch.tensor(0.3, dtype=torch.double)
    return sae


def save(entry):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(entry.get("seed", 0))
    d_in, d_sae, k, d_out = entry["d_in"], entry["d_sae"], entry["k"], entry.get("d_out", entry["d_in"])
    x = torch.randn(64, d_in, generator=gen)
    if entry["lib"] == "saelens":
        from sae_lens import SAE

        sae = build_saelens(entry["kind"], d_in, d_sae, k, d_out, gen)
        folder = entry["folder"]
        if entry["kind"] == "batchtopk_training":
            sae.save_inference_model(folder)  # BatchTopK -> JumpReLU with the learned threshold
        elif entry["kind"] == "matryoshka_batchtopk_training":
            # Its training folder (which SAELens itself does not load) is what we import; the
            # reference outputs come from the inference form SAELens loads.
            sae.save_model(folder)
            folder = folder + "_inference"
            sae.save_inference_model(folder)
        else:
            sae.save_model(folder)
        loaded = SAE.load_from_disk(folder).eval()
        codes, recon = saelens_outputs(loaded, x)
        info = {"class": type(loaded).__name__}
    else:
        from sparsify import Sae, SparseCoderConfig

        transcode = entry["kind"] == "skip_transcoder"
        cfg = SparseCoderConfig(num_latents=d_sae, k=k, transcode=transcode, skip_connection=transcode)
        sae = Sae(d_in, cfg)
        _perturb(sae, gen)
        sae.save_to_disk(entry["folder"])
        loaded = Sae.load_from_disk(entry["folder"])
        codes, recon = sparsify_outputs(loaded, x)
        info = {"class": type(loaded).__name__}
    save_file({"x": x, "codes": codes.contiguous(), "recon": recon.contiguous()}, entry["out"])
    return info


def main(job_path):
    job = json.loads(open(job_path).read())
    import sae_lens
    import sparsify

    report = {"versions": {"sae_lens": sae_lens.__version__, "sparsify": getattr(sparsify, "__version__", "?"),
                           "torch": torch.__version__}, "load": [], "save": []}
    report["load"] = [load(e) for e in job.get("load", [])]
    report["save"] = [save(e) for e in job.get("save", [])]
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
