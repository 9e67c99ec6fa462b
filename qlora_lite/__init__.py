"""qlora_lite: fine-tune language models with LoRA/QLoRA on the machine you have.

import qlora_lite
hw = qlora_lite.detect()
print(qlora_lite.plan("path/to/model", hardware="t4").explain())
result = qlora_lite.train(model="path/to/model", data="train.jsonl", output_dir="runs/my-run")
print(qlora_lite.generate("Hello!", adapter=result.adapter_dir))
"""

from __future__ import annotations

# First: a library pip upgraded under this (notebook) process means a restart; say so before anything breaks.
from qlora_lite.demo.colab import check_fresh_imports

check_fresh_imports()

# No module is named like a public function any more (train, plan, generate live in subpackages), so the
# functions below are plain attributes; old module paths fail with their new place (qlora_lite.compat).
from qlora_lite.compat import install_moved_module_finder
from qlora_lite.data.formats import detect_format, load_records
from qlora_lite.demo.model import ensure_demo_model
from qlora_lite.demo.run import run_demo
from qlora_lite.errors import UserError
from qlora_lite.hub.push import push, resolve_adapter
from qlora_lite.inference.adapters import AdapterSet, Completion
from qlora_lite.inference.classification import classify, load_classifier
from qlora_lite.inference.generation import Generator, generate
from qlora_lite.inference.merge import merge_adapter
from qlora_lite.inference.router import Router
from qlora_lite.inference.server import serve
from qlora_lite.planner.hardware import HardwareProfile, detect
from qlora_lite.planner.memory import estimate_memory
from qlora_lite.planner.planning import Plan, plan
from qlora_lite.planner.profiles import get_profile
from qlora_lite.training.api import train, train_classifier
from qlora_lite.training.task_classifier import ClassifierResult
from qlora_lite.training.tasks import TrainResult

install_moved_module_finder()

__version__ = "0.1.0"

__all__ = [
    "AdapterSet",
    "Completion",
    "ClassifierResult",
    "Generator",
    "HardwareProfile",
    "Plan",
    "Router",
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
    "merge_adapter",
    "plan",
    "push",
    "resolve_adapter",
    "run_demo",
    "serve",
    "train",
    "train_classifier",
]
