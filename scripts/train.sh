#!/usr/bin/env bash
# One command for the main job: sets up .venv if needed, then runs `python -m erpo_fast.train` (args passed on).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
exec "$ERPO_PYTHON" -m erpo_fast.train "$@"
