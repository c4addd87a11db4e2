#!/usr/bin/env bash
# The main job on the embedded offline default, end to end:
#   1. harvest the packaged MiniLM (residual stream after layer 3) over the built-in corpus
#      (Python's own documentation) into a sharded buffer,
#   2. train a TopK SAE (16x, k=32) on it,
#   3. evaluate it (held-out FVU, L0, dead latents, spliced-model fidelity) and write a report.
# Starts fresh in runs/demo each time (a complete buffer is otherwise never overwritten).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
OUT="${OUT:-runs/demo}"
rm -rf "$OUT"
sae-harvest writer.out_dir="$OUT/buffer"
sae-train data=buffer data.buffer.path="$OUT/buffer" train=demo train.out_dir="$OUT/sae" "$@"
