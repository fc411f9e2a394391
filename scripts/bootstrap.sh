#!/usr/bin/env bash
# Shared set-up for scripts/test.sh and scripts/train.sh: a project-local virtual environment (.venv)
# with erpo-fast installed in editable mode.
#
# torch is installed first, pinned, so that nothing later resolves "torch" to the newest CUDA build:
#   - no NVIDIA driver (CPU machine): torch==$ERPO_TORCH_VERSION, which these machines serve as a local CPU wheel;
#   - an NVIDIA GPU: whatever torch is already importable is kept; otherwise the same pin (CUDA build).
# Re-running is cheap: a stamp file records the hash of pyproject.toml/setup.py that was installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ERPO_VENV:-$ROOT/.venv}"
TORCH_VERSION="${ERPO_TORCH_VERSION:-2.13.0}"
EXTRAS="${ERPO_EXTRAS:-dev}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating virtual environment in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$VENV/.erpo-fast-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1) extras=$EXTRAS torch=$TORCH_VERSION"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    pip_q() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }
    if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
        echo "[bootstrap] installing torch==$TORCH_VERSION" >&2
        pip_q "torch==$TORCH_VERSION"
    fi
    "$VPY" -c "import torch" || { echo "[bootstrap] torch failed to install" >&2; exit 1; }
    echo "[bootstrap] installing erpo-fast[$EXTRAS] (editable)" >&2
    pip_q setuptools wheel
    # --no-build-isolation: the build never sees a second torch; csrc/ compiles on first use instead.
    pip_q --no-build-isolation -e "$ROOT[$EXTRAS]"
    "$VPY" -c "import erpo_fast.kernels, numba, transformers" || { echo "[bootstrap] install incomplete" >&2; exit 1; }
    if "$VPY" -m pip list 2>/dev/null | grep -qi '^nvidia-' && ! command -v nvidia-smi >/dev/null; then
        echo "[bootstrap] warning: CUDA packages were installed on a machine without an NVIDIA driver" >&2
    fi
    echo "$WANT" > "$STAMP"
fi
export ERPO_PYTHON="$VPY"
