#!/usr/bin/env bash
# One node, NPROC processes (default: one per GPU, else 2 CPU processes with gloo).
#   PARALLEL=data bash launch/torchrun_single_node.sh data=buffer data.path=buffers/minilm sae.k=32
# Strategies: data (replicated SAE), latent (sharded latents), sae (one SAE per rank: hook points, sweeps).
# --max-restarts lets torchrun restart every rank after a failure; training resumes from the
# newest checkpoint in train.out_dir (set train.checkpoint_every).
set -euo pipefail
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}"
OUT="${OUT:-runs/torchrun}"
exec torchrun --standalone --nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  "$(command -v sae-train)" train.parallel="${PARALLEL:-data}" train.out_dir="$OUT" hydra.run.dir="$OUT" "$@"
