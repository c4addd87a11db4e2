#!/usr/bin/env bash
# The main job on the embedded offline default: set up .venv if needed, then train and report.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
sae-train data=synthetic train.out_dir=runs/demo "$@"
