#!/usr/bin/env bash
# One command for the test suite: sets up .venv if needed, then runs pytest (extra args are passed on).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
"$ERPO_PYTHON" -m ruff check .
exec "$ERPO_PYTHON" -m pytest "$@"
