#!/usr/bin/env bash
# Set up (if needed) and run the default test suite (CPU, no network; slow tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "${QLORA_LITE_VENV:-.venv}/bin/python" -m pytest -q -m "not slow and not gpu" "$@"
