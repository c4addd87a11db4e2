"""Runs inside .venv-peers (launch/peers_env.sh): circuit-tracer loads our exports and saves its own.

Usage: python peer_circuit_tracer.py JOB.json. It never imports sae-forge. For each entry of the job:

- ``load``: load an exported folder with circuit-tracer's loaders: from a local folder through
  ``load_transcoders_from_cache`` (reads config.yaml like a Hub download, then ``load_transcoder_set``
  or ``load_clt``), or from a Hub repo through ``load_transcoder_from_hub`` (``HF_ENDPOINT``). On
  the layers' inputs ``x`` [N, B, D] of ``ref`` it writes ``codes`` [N, B, L] (``encode``),
  ``recon`` [N, B, D] (``decode``: the skip path included) and ``attr_recon`` (the reconstruction
  ``compute_attribution_components`` builds attribution graphs from; position 0 zeroed) to ``out``;
- ``save``: build a circuit-tracer model with random weights (``SingleLayerTranscoder`` set or
  ``CrossLayerTranscoder``, JumpReLU), save it with its ``to_safetensors`` into ``folder``, and
  write ``x``, ``codes`` and ``recon`` to ``out``.

The calling test (test_circuit_tracer.py) compares these outputs with ours.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CPU = torch.device("cpu")


def _dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


@torch.no_grad()
def outputs(model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from circuit_tracer.transcoder import TranscoderSet

    codes = model.encode(x)
    if isinstance(model, TranscoderSet):
        recon = model.decode(codes, x)
    else:  # the CLT decodes sparse codes; positions up to the last active one
        recon = model.decode(codes.to_sparse(), x)
    attr = model.compute_attribution_components(x)["reconstruction"]
    return {"codes": _dense(codes), "recon": recon, "attr_recon": attr}


def load(entry: dict) -> dict:
    from circuit_tracer.utils.caching import load_transcoders_from_cache
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    if entry.get("repo"):
        model, cfg = load_transcoder_from_hub(entry["repo"], device=CPU, dtype=torch.float32, use_cache=False)
    else:
        folder = Path(entry["folder"])
        model, cfg = load_transcoders_from_cache(folder.name, cache_dir=folder.parent, device=CPU,
                                                 dtype=torch.float32)
    x = load_file(entry["ref"])["x"]
    save_file({k: v.contiguous() for k, v in outputs(model, x).items()}, entry["out"])
    act = getattr(model, "activation_function", None) or model[0].activation_function
    return {"class": type(model).__name__, "n_layers": model.n_layers, "d_transcoder": model.d_transcoder,
            "activation": getattr(act, "__name__", type(act).__name__), "skip": model.skip_connection,
            "feature_input_hook": model.feature_input_hook, "feature_output_hook": model.feature_output_hook,
            "model_name": cfg.get("model_name")}


def _randomize(model, gen: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if "threshold" in name:
            p.data = torch.empty(p.shape).uniform_(0.05, 0.6, generator=gen)
        else:
            p.data = 0.3 * torch.randn(p.shape, generator=gen)


def save(entry: dict) -> dict:
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    gen = torch.Generator().manual_seed(entry.get("seed", 0))
    n, d, L = entry["n_layers"], entry["d_model"], entry["d_transcoder"]
    if entry["kind"] == "set":
        model = TranscoderSet({i: SingleLayerTranscoder(d, L, JumpReLU(torch.zeros(L), 0.1), i, skip_connection=True,
                                                        device=CPU, dtype=torch.float32) for i in range(n)},
                              feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out")
    else:
        model = CrossLayerTranscoder(n, L, d, activation_function="jump_relu", lazy_decoder=False, device=CPU,
                                     dtype=torch.float32)
    _randomize(model, gen)
    model.to_safetensors(entry["folder"])
    x = torch.randn(n, 32, d, generator=gen)
    save_file({"x": x, **{k: v.contiguous() for k, v in outputs(model, x).items()}}, entry["out"])
    return {"class": type(model).__name__}


def main(job_path: str) -> None:
    try:
        import circuit_tracer
    except ImportError as e:  # a .venv-peers made before circuit-tracer joined it: the test skips and says so
        print(json.dumps({"unavailable": str(e)}))
        return
    job = json.loads(Path(job_path).read_text())
    report = {"versions": {"circuit_tracer": circuit_tracer.__version__, "torch": torch.__version__},
              "load": [load(e) for e in job.get("load", [])], "save": [save(e) for e in job.get("save", [])]}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
