#!/usr/bin/env bash
# Set up (if needed) and run the built-in demo: SmolLM2-135M-Instruct, 4-bit LoRA on CPU, before/after accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${QLORA_LITE_VENV:-.venv}/bin/qlora-lite" demo "$@"
