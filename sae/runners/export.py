"""Arguments of ``sae-export`` (argparse: paths and flags, no config tree to compose).

    sae-export runs/x/final/topk runs/x/hf --format saelens
    sae-export runs/x runs/x/hf --format sparsify --push-to-hub me/sae-pythia-70m --private
    sae-export EleutherAI/sae-pythia-70m-32k out --hookpoint layers.3 --format ours   # convert
    sae-export runs/tc-layer0 runs/tc-layer1 runs/tc-layer2 runs/tc-hf --format circuit-tracer
"""

from __future__ import annotations

import argparse
import sys

from sae.export.export import DTYPES, export_checkpoint
from sae.export.hub import MissingTokenError
from sae.export.load import FORMATS

DESCRIPTION = """Write trained SAEs as Hugging Face folders (one per hook point: weights, cfg.json, README.md
model card) in our format, SAELens' or sparsify's, and optionally upload them to the Hub. With
--format circuit-tracer, a model's transcoders (one per layer, layers.N.mlp_in -> layers.N.mlp, or
one cross-layer transcoder) go into OUT_DIR itself as one set circuit-tracer loads. OUT_DIR must be new
or empty; --overwrite replaces its whole contents (written aside first, so a failed export keeps it).

examples:
    sae-export runs/x/final/topk runs/x/hf --format saelens
    sae-export runs/x runs/x/hf --format sparsify --push-to-hub me/sae-pythia-70m --private
    sae-export EleutherAI/sae-pythia-70m-32k out --hookpoint layers.3 --format ours   # convert
    sae-export runs/tc-layer0 runs/tc-layer1 runs/tc-layer2 runs/tc-hf --format circuit-tracer"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sae-export", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="+", help="SAE folder (final/<name>, checkpoints/step_N/<name>, "
                                                 "latent-parallel shards), a checkpoint step, final/ or run folder, "
                                                 "or a SAELens/sparsify/circuit-tracer folder or Hub repo; several "
                                                 "are exported together")
    p.add_argument("out_dir", help="export folder: one sub-folder per hook point plus README.md (circuit-tracer: "
                                   "config.yaml and the weights)")
    p.add_argument("--format", choices=FORMATS, default="saelens", help="weights layout (default: saelens)")
    p.add_argument("--hookpoint", default=None, help="folder name for a single SAE (default: its training hook point); "
                                                     "for a foreign multi-SAE source, the SAE to take")
    p.add_argument("--model-name", default=None, help="model named in the card when the checkpoint does not record it")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the written weights")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default="", help="upload the export folder to this model repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--revision", default=None, help="Hub branch to commit to (created if missing; default main)")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty OUT_DIR (default: "
                                                            "refuse it)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        sources = args.checkpoint[0] if len(args.checkpoint) == 1 else args.checkpoint
        result = export_checkpoint(sources, args.out_dir, args.format, hookpoint=args.hookpoint,
                                   model_name=args.model_name, dtype=args.dtype, push_to_hub=args.push_to_hub,
                                   private=args.private, revision=args.revision, overwrite=args.overwrite)
    except (MissingTokenError, OSError, ValueError) as e:  # user errors: the message says the fix
        sys.exit(f"sae-export: error: {e}")
    for name, folder in result.folders.items():
        print(f"{name} -> {folder} ({result.format})")
    if args.push_to_hub:
        print(f"uploaded to {args.push_to_hub}: {result.commit_url or 'no change since the last upload'}")
