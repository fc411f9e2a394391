#!/usr/bin/env bash
# One command for the test suite: sets up .venv if needed, runs ruff and pytest (extra args are passed on),
# then the vLLM engine's tests (`pytest -m vllm`) in .venv-vllm, with vLLM's CPU build (scripts/vllm_env.sh).
#
# The vLLM stage runs when no pytest arguments are given (as in CI) or when ERPO_VLLM_TESTS=1; set
# ERPO_VLLM_TESTS=0 to leave it out. In that stage a vLLM that does not import fails the run, never skips.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
"$ERPO_PYTHON" -m ruff check .
"$ERPO_PYTHON" -m pytest "$@"
if [ "${ERPO_VLLM_TESTS:-$([ $# -eq 0 ] && echo 1 || echo 0)}" = "1" ]; then
    source "$ROOT/scripts/vllm_env.sh"
    echo "[test] vLLM engine tests in $(dirname "$(dirname "$ERPO_VLLM_PYTHON")") (vLLM's CPU build)" >&2
    ERPO_REQUIRE_VLLM=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
        "$ERPO_VLLM_PYTHON" -m pytest -m vllm -p no:cacheprovider
fi
