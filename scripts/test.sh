#!/usr/bin/env bash
# The whole test suite: lint, format check, type check, then pytest (unit, integration on loopback, DVC).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
# Offline by construction: no library may reach a model hub during tests.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 YOLO_OFFLINE=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

start=$(date +%s)
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy
echo "== pytest"
pytest "$@"
echo "test: wall time $(( $(date +%s) - start )) s"
