#!/usr/bin/env bash
# Run this on every node (same command; NODE_RANK may differ). MASTER_ADDR is any node reachable
# by all; train.out_dir must be on a file system every node sees (checkpoints are sharded there).
#   NNODES=4 MASTER_ADDR=node0 PARALLEL=data bash launch/torchrun_multi_node.sh data=buffer data.path=/shared/buf
set -euo pipefail
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR}"
NPROC="${NPROC:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
OUT="${OUT:-runs/multinode}"
exec torchrun --nnodes="$NNODES" --nproc-per-node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id="${RDZV_ID:-sae-forge}" \
  "$(command -v sae-train)" train.parallel="${PARALLEL:-data}" train.out_dir="$OUT" hydra.run.dir="$OUT" "$@"
