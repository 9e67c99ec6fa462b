"""qlora_lite: fine-tune language models with LoRA/QLoRA on the machine you have.

    import qlora_lite
    hw = qlora_lite.detect()
    print(qlora_lite.plan("path/to/model", hardware="t4").explain())
    result = qlora_lite.train(model="path/to/model", data="train.jsonl", output_dir="runs/my-run")
    print(qlora_lite.generate("Hello!", adapter=result.adapter_dir))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module; imported on first use so `import qlora_lite` stays fast (no torch until needed).
_EXPORTS = {
    "detect": "hardware",
    "HardwareProfile": "hardware",
    "plan": "plan",
    "Plan": "plan",
    "estimate_memory": "memory",
    "get_profile": "profiles",
    "train": "train",
    "TrainResult": "train",
    "generate": "generate",
    "Generator": "generate",
    "load_records": "data",
    "detect_format": "data",
    "UserError": "errors",
    "ensure_demo_model": "demo_model",
    "run_demo": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qlora_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
