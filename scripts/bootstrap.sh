#!/usr/bin/env bash
# Shared set-up for scripts/test.sh and scripts/train.sh: a project-local virtual environment (.venv) with the
# exact dependency versions of requirements/lock.txt (see scripts/install_lock.sh for how torch is chosen) and
# erpo-fast installed in editable mode, without build isolation (csrc/ compiles on first use instead).
# Re-running is cheap: a stamp file records the hash of the lock, pyproject.toml and setup.py that was installed.
#
# ERPO_VENV (default .venv), ERPO_LOCK (default requirements/lock.txt), ERPO_EXTRAS (default dev; other extras,
# e.g. dev,bench, are resolved by pip on top, constrained by the lock).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ERPO_VENV:-$ROOT/.venv}"
LOCK="${ERPO_LOCK:-$ROOT/requirements/lock.txt}"
EXTRAS="${ERPO_EXTRAS:-dev}"
PY="${PYTHON:-python3}"
source "$ROOT/scripts/install_lock.sh"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$VENV/.erpo-fast-installed"
WANT="$(cat "$LOCK" "$ROOT/pyproject.toml" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1) extras=$EXTRAS"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[bootstrap] installing the locked dependencies ($(basename "$LOCK")) into $VENV" >&2
    install_lock "$VPY" "$LOCK"
    echo "[bootstrap] installing erpo-fast (editable)" >&2
    pip_q "$VPY" --no-deps --no-build-isolation -e "$ROOT"
    if [ "$EXTRAS" != "dev" ]; then
        pip_q "$VPY" --no-build-isolation -c "$VENV/.lock-installed.txt" -e "$ROOT[$EXTRAS]"
    fi
    "$VPY" -c "import erpo_fast.kernels.fused_linear, numba, transformers" \
        || { echo "[bootstrap] install incomplete" >&2; exit 1; }
    if "$VPY" -m pip list 2>/dev/null | grep -qi '^nvidia-' && ! command -v nvidia-smi >/dev/null; then
        echo "[bootstrap] warning: CUDA packages were installed on a machine without an NVIDIA driver" >&2
    fi
    echo "$WANT" > "$STAMP"
fi
export ERPO_PYTHON="$VPY"
