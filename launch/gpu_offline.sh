#!/usr/bin/env bash
# Run this project on a CUDA machine without network access.
#
#   bash launch/gpu_offline.sh fetch [DIR]     # on a machine with PyPI access: download the wheels
#   bash launch/gpu_offline.sh install [DIR]   # on the CUDA machine, from the project root
#
# The CUDA machine must already have Python with torch (a CUDA build), triton, transformers,
# accelerate, safetensors, numpy, matplotlib, xxhash and tqdm (a stock PyTorch image does). What it
# lacks is fetched here: hydra-core, omegaconf and antlr4 (configs), datasets, dill and
# multiprocess (text sources), and eai-sparsify with its small dependencies (for the comparison
# row of `python -m sae.bench.gpu`; optional). `install` puts them and this project into
# $SITE (default /tmp/site) without touching the image's packages; then:
#
#   export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
#   python -m sae.bench.gpu --out runs/bench_gpu
set -euo pipefail
cmd=${1:-}
DIR=${2:-.whl}
SITE=${SITE:-/tmp/site}
case "$cmd" in
  fetch)
    mkdir -p "$DIR"
    PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
      "${PLAT[@]}" -d "$DIR" hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
      eai-sparsify==1.3.3 natsort schedulefree simple-parsing docstring-parser
    python3 -m pip wheel -q --no-deps -w "$DIR" antlr4-python3-runtime==4.9.3  # sdist only on PyPI
    ls "$DIR" ;;
  install)
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$DIR"/*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" .
    echo "installed into $SITE: export PYTHONPATH=$SITE PATH=$SITE/bin:\$PATH" ;;
  *)
    echo "usage: bash launch/gpu_offline.sh fetch|install [DIR]" >&2; exit 2 ;;
esac
