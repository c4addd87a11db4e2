#!/usr/bin/env bash
# Start one W&B sweep agent per GPU of this node, each pinned to its GPU with CUDA_VISIBLE_DEVICES,
# so a sweep runs one trial per GPU at a time. Agents run in the background; this script waits for
# them and stops them all on Ctrl-C.
#   bash launch/sweep_agents.sh ENTITY/PROJECT/SWEEP_ID [extra `wandb agent` args, e.g. --count 5]
# GPUs: $GPUS (e.g. GPUS="0 1 2") or every GPU nvidia-smi lists. Logs: $LOG_DIR/agent_gpu<i>.log.
set -euo pipefail
if [ "$#" -lt 1 ]; then
  echo "usage: $0 ENTITY/PROJECT/SWEEP_ID [wandb agent args...]  (create one with: wandb sweep launch/sweeps/grid.yaml)" >&2
  exit 2
fi
SWEEP="$1"; shift
if [ -z "${GPUS:-}" ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no GPUS given and nvidia-smi not found; set GPUS=\"0 1 ...\" (or run a single 'wandb agent $SWEEP')" >&2
    exit 2
  fi
  GPUS="$(nvidia-smi --query-gpu=index --format=csv,noheader | tr '\n' ' ')"
fi
LOG_DIR="${LOG_DIR:-runs/sweeps/agents}"
mkdir -p "$LOG_DIR"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
for gpu in $GPUS; do
  CUDA_VISIBLE_DEVICES="$gpu" wandb agent "$SWEEP" "$@" >"$LOG_DIR/agent_gpu$gpu.log" 2>&1 &
  pids+=("$!")
  echo "agent on GPU $gpu: pid $!, log $LOG_DIR/agent_gpu$gpu.log"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
