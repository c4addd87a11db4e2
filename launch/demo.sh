#!/usr/bin/env bash
# The main job on the offline default, end to end:
#   1. harvest SmolLM2-135M (the residual stream after block 15 of 30; packaged as a GGUF file,
#      converted once into a cached Hugging Face folder) over the built-in corpus (Python's own
#      documentation) into a sharded buffer,
#   2. train a TopK SAE (16x, k=32) on it,
#   3. evaluate it (held-out FVU, L0, dead latents, CE loss recovered and KL of the spliced model)
#      and write a report with logit-effect dashboards.
# MODEL=minilm runs the same job on all-MiniLM-L6-v2 (a sentence encoder: layer 3, embedding
# fidelity instead of CE). Extra arguments go to sae-train. Starts fresh in $OUT each time.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
OUT="${OUT:-runs/demo}"
MODEL="${MODEL:-smollm2}"
case "$MODEL" in
  smollm2) harvest=(model=smollm2 'hookpoints=[layers.15]' harvest.max_tokens=262144); train=demo_lm ;;
  minilm) harvest=(); train=demo ;;
  *) echo "MODEL=$MODEL: choose smollm2 (the default) or minilm" >&2; exit 2 ;;
esac
rm -rf "$OUT"
sae-harvest "${harvest[@]}" writer.out_dir="$OUT/buffer"
sae-train data=buffer data.buffer.path="$OUT/buffer" train="$train" train.out_dir="$OUT/sae" "$@"
