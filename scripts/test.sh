#!/usr/bin/env bash
# One command for the test suite: sets up .venv if needed, runs ruff and pytest (extra args are passed on),
# then the vLLM engine's tests (`pytest -m vllm`) in .venv-vllm, with vLLM's CPU build (scripts/vllm_env.sh).
#
# The vLLM stage runs when no pytest arguments are given (as in CI) or when ERPO_VLLM_TESTS=1; set
# ERPO_VLLM_TESTS=0 to leave it out. In that stage a vLLM that does not import fails the run, never skips.
#
# ERPO_DEPS=latest moves the locks forward: the newest releases go into .deps-latest/ (scripts/lock.sh
# --upgrade), the suite runs against them in separate environments (.venv-latest, .venv-vllm-latest), and only
# when it passes are requirements/lock*.txt rewritten, with a list of what moved.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "${ERPO_DEPS:-locked}" = latest ]; then
    cand="$ROOT/.deps-latest"
    bash "$ROOT/scripts/lock.sh" --upgrade --out "$cand"
    vllm_stage="${ERPO_VLLM_TESTS:-1}"
    ERPO_DEPS=locked ERPO_VLLM_TESTS="$vllm_stage" ERPO_VENV="$ROOT/.venv-latest" ERPO_LOCK="$cand/lock.txt" \
        ERPO_VLLM_VENV="$ROOT/.venv-vllm-latest" ERPO_VLLM_LOCK="$cand/lock-vllm.txt" \
        bash "$ROOT/scripts/test.sh" "$@"
    pins() { grep -E '^[A-Za-z0-9_.-]+==' "$1" | sed 's/ .*//; s/==/ /' | sort; }
    moved=(lock.txt)
    [ "$vllm_stage" = 1 ] && moved+=(lock-vllm.txt)
    for f in "${moved[@]}"; do
        echo "[deps] the suite passed on the newest releases: requirements/$f moves:" >&2
        join -a1 -a2 -e '-' -o 0,1.2,2.2 <(pins "$ROOT/requirements/$f") <(pins "$cand/$f") \
            | awk '$2 != $3 {print "  " $1 ": " $2 " -> " $3; n++} END {if (!n) print "  (nothing)"}' >&2
        cp "$cand/$f" "$ROOT/requirements/$f"
    done
    echo "[deps] review and commit requirements/; if a package listed under the README's 'Tested versions' moved," \
         "update that list (tests/test_docs.py checks it against the locks)" >&2
    exit 0
fi

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
