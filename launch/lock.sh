#!/usr/bin/env bash
# Regenerate the install locks from their inputs (the one command to refresh them):
#   launch/lock/cpu.txt    <- pyproject.toml (dependencies + dev, smollm2 extras) + launch/lock/cpu.in   (.venv)
#   launch/lock/peers.txt  <- launch/lock/peers.in                                          (.venv-peers)
# Each lock pins every package of its environment (all transitive dependencies) for CPython 3.11 on
# x86_64 Linux, the machines README and CI run on. Resolved by uv (pinned below, in .venv-lock) with
# the local torch CPU wheel folder ($TORCH_WHEELS, default /opt/wheels) beside PyPI.
# Existing pins are kept unless an input needs another version (UPGRADE=1: newest of everything).
# After a refresh: bash launch/test.sh (rebuilds .venv and .venv-peers from the new locks), then commit
# the locks. To see what the newest releases would change first: bash launch/canary.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
UV_VERSION=0.13.9
TOOLS=.venv-lock
if [ ! -x "$TOOLS/bin/uv" ] || [ "$("$TOOLS/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  "${PYTHON:-python3}" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q "uv==$UV_VERSION"
fi
compile() {  # compile OUT INPUT...
  local out=$1; shift
  # uv keeps the pins of an existing output file unless an input needs another version: a refresh
  # after adding a dependency moves nothing else. UPGRADE=1 bash launch/lock.sh takes the newest.
  if [ -f "$out" ] && [ "${UPGRADE:-0}" != 1 ]; then cp "$out" "$out.tmp"; else rm -f "$out.tmp"; fi
  "$TOOLS/bin/uv" pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --find-links "${TORCH_WHEELS:-/opt/wheels}" --custom-compile-command "bash launch/lock.sh" \
    --no-header "$@" -o "$out.tmp"
  { echo "# Locked by: bash launch/lock.sh (uv $UV_VERSION, CPython 3.11, x86_64 Linux). Do not edit by hand."
    cat "$out.tmp"; } >"$out"
  rm -f "$out.tmp"
  echo "$out: $(grep -c '^[A-Za-z0-9_.-]*==' "$out") packages"
}
compile launch/lock/cpu.txt pyproject.toml launch/lock/cpu.in --extra dev --extra smollm2
compile launch/lock/peers.txt launch/lock/peers.in
