#!/usr/bin/env bash
# Lint, type-check and run the whole suite. The test session itself starts a throwaway Redis
# and PostgreSQL cluster on free loopback ports and stops them at the end, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin

scripts/ensure-services.sh
echo "== ruff"
"$BIN/ruff" check .
"$BIN/ruff" format --check .
echo "== mypy --strict"
"$BIN/mypy" --strict gathering_tasks
echo "== pytest"
"$BIN/pytest" "$@"
