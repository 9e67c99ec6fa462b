"""qlora_lite: fine-tune language models with LoRA/QLoRA on the machine you have.

import qlora_lite
hw = qlora_lite.detect()
print(qlora_lite.plan("path/to/model", hardware="t4").explain())
result = qlora_lite.train(model="path/to/model", data="train.jsonl", output_dir="runs/my-run")
print(qlora_lite.generate("Hello!", adapter=result.adapter_dir))
"""

from __future__ import annotations

# Imported eagerly on purpose: `train`, `plan` and `generate` are both modules and functions, and the
# function must win whatever imports the submodule later.
from .classify import train_classifier
from .classify_predict import classify, load_classifier
from .data import detect_format, load_records
from .demo import run_demo
from .demo_model import ensure_demo_model
from .errors import UserError
from .generate import Generator, generate
from .hardware import HardwareProfile, detect
from .hub import push, resolve_adapter
from .memory import estimate_memory
from .plan import Plan, plan
from .profiles import get_profile
from .train import TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "Generator",
    "HardwareProfile",
    "Plan",
    "TrainResult",
    "UserError",
    "classify",
    "detect",
    "detect_format",
    "ensure_demo_model",
    "estimate_memory",
    "generate",
    "get_profile",
    "load_classifier",
    "load_records",
    "plan",
    "push",
    "resolve_adapter",
    "run_demo",
    "train",
    "train_classifier",
]
