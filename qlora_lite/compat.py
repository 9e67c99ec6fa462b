"""Workarounds for upstream behaviour, each in one place with the versions it applies to and when it can go.

Nothing else in the package patches a library; a workaround that is no longer needed is deleted here alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

# ------------------------------------------------------------------ bitsandbytes: CPU inference repacking

# bitsandbytes >= 0.48 repacks a Linear4bit's weight for an AVX512-BF16 kernel the first time it runs in eval
# mode without grad on CPU, and keeps it so: later training steps then go through `gemv_4bit`, which has no
# autograd, and the gradients reaching LoRA layers below it are silently wrong. Evaluation inside a training
# run triggers exactly that. DoRA inference breaks the same way: its weight norms dequantize the repacked bytes
# (plain PEFT logits off by ~0.1 on a tiny model), and the inverse repacking is not exact (1e-3 left), so a DoRA
# adapter loaded into an AdapterSet after answers were given read other weights. Every base qlora_lite loads
# (training and inference) has the repacking off: the kernel training used, one set of numbers everywhere (CPU
# logits ~3e-3 from plain PEFT's repacked kernel on such CPUs; GPUs are unaffected). Can go when bitsandbytes
# undoes the packing on `.train()` and exactly (set the version here).
BNB_REPACK_FIXED_IN: tuple[int, ...] | None = None


def _version(package: str) -> tuple[int, ...] | None:
    try:
        text = metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def bnb_repack_guard_needed() -> bool:
    version = _version("bitsandbytes")
    if version is None:
        return False
    return BNB_REPACK_FIXED_IN is None or version < BNB_REPACK_FIXED_IN


def keep_4bit_weights_differentiable(model: Any) -> int:
    """Turn off bitsandbytes' CPU inference repacking on a model that will be trained; returns how many
    4-bit layers were changed (0 when the installed bitsandbytes does not need it)."""
    if not bnb_repack_guard_needed():
        return 0
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


# ------------------------------------------------------------- logging: redact secrets process-wide

# The standard library offers no hook that sees every record on every handler, including handlers that
# libraries add later, so a record factory is installed once for the process. Filters were tried and miss
# child loggers' records. Stays as long as the `logging` module has no such hook.
_redactors: list[Callable[[str], str]] = []


def install_log_redaction(redact: Callable[[str], str]) -> None:
    """Pass the message of every log record made from now on through `redact` (installed once per function)."""
    if redact in _redactors:
        return
    first = not _redactors
    _redactors.append(redact)
    if not first:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is logging's problem, not ours
            return record
        clean = message
        for each in _redactors:
            clean = each(clean)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # The traceback of log.exception()/exc_info=True: formatted now, redacted, and kept as the text
            # every Formatter prints (Formatter.format only formats exc_info when exc_text is empty).
            text = logging.Formatter().formatException(record.exc_info)
            clean = text
            for each in _redactors:
                clean = each(clean)
            if clean != text:
                record.exc_text = clean
        return record

    logging.setLogRecordFactory(factory)


# ------------------------------------------------------------ old import paths (the flat layout, <= 0.1)

# Until the package was split into subpackages (issue [7]) every module sat directly in qlora_lite/. Users'
# scripts may import them by the old names: each now fails at once with the new place in the message
# (ModuleNotFoundError), instead of a bare "No module named". Old names that are packages now (hub, checkpoint,
# data, demo, model, cli) forward the attributes their old module had. Can go with the 1.0 release.
MOVED_MODULES = {
    "checkpoint_manifest": "qlora_lite.checkpoint.manifest",
    "classify": "qlora_lite.inference.classification (classify, load_classifier) and qlora_lite.training.api "
    "(train_classifier); all three are in `qlora_lite` itself",
    "classify_cli": "qlora_lite.cli.classify",
    "classify_data": "qlora_lite.data.labels",
    "classify_predict": "qlora_lite.inference.classification",
    "demo_classify": "qlora_lite.demo.classify",
    "demo_model": "qlora_lite.demo.model",
    "demo_task": "qlora_lite.demo.task",
    "durable": "qlora_lite.checkpoint.durable",
    "durable_copy": "qlora_lite.checkpoint.copier",
    "encode": "qlora_lite.data.encoding",
    "evaluate": "qlora_lite.training.evaluation",
    "gen_eval": "qlora_lite.training.generation_eval",
    "generate": "qlora_lite.inference.generation (Generator, generate; both are in `qlora_lite` itself)",
    "hardware": "qlora_lite.planner.hardware",
    "hub_backend": "qlora_lite.hub.checkpoints",
    "hub_card": "qlora_lite.hub.card",
    "hub_cli": "qlora_lite.cli.hub",
    "loop": "qlora_lite.training.loop",
    "memory": "qlora_lite.planner.memory",
    "peak": "qlora_lite.planner.peak",
    "plan": "qlora_lite.planner.planning (plan, Plan; both are in `qlora_lite` itself)",
    "plan_cli": "qlora_lite.cli.plan",
    "profiles": "qlora_lite.planner.profiles",
    "record": "qlora_lite.training.record",
    "resume": "qlora_lite.checkpoint.resume",
    "run_setup": "qlora_lite.training.setup",
    "runs": "qlora_lite.checkpoint.runs",
    "train": "qlora_lite.training.api (train, train_classifier; both are in `qlora_lite` itself) and "
    "qlora_lite.training.run (the trainer)",
}
# Old modules whose name is a subpackage now: where their public names went, in lookup order.
FORWARDED = {
    "qlora_lite.checkpoint": ("qlora_lite.checkpoint.store",),
    "qlora_lite.cli": ("qlora_lite.cli.main",),
    "qlora_lite.data": ("qlora_lite.data.formats",),
    "qlora_lite.demo": ("qlora_lite.demo.run",),
    "qlora_lite.hub": ("qlora_lite.hub.client", "qlora_lite.hub.token", "qlora_lite.hub.push"),
    "qlora_lite.model": ("qlora_lite.model.loading",),
}


class MovedModuleFinder:
    """A meta-path finder that answers an old module name with ModuleNotFoundError naming the new place."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        package, _, name = fullname.rpartition(".")
        if package == "qlora_lite" and name in MOVED_MODULES:
            raise ModuleNotFoundError(
                f"{fullname} moved to {MOVED_MODULES[name]}: import it from there", name=fullname
            )
        return None


def install_moved_module_finder() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())  # last: real modules are always found first


def forward(package: str, name: str) -> Any:
    """`package.name` for a name the old flat module `package` had: found in its new module, with a warning."""
    missing = AttributeError(f"module {package!r} has no attribute {name!r}")
    # Dunder probes and the package's own submodules (which `from package import sub` imports) are not ours.
    if name.startswith("__") or importlib.util.find_spec(f"{package}.{name}") is not None:
        raise missing
    for module_name in FORWARDED.get(package, ()):
        module = importlib.import_module(module_name)
        if hasattr(module, name):
            warnings.warn(f"{package}.{name} moved to {module_name}.{name}", DeprecationWarning, stacklevel=3)
            return getattr(module, name)
    raise missing


def callable_module(module_name: str, function: Callable[..., Any]) -> None:
    """Make the module `module_name` callable as `function`: `from qlora_lite.hub import push; push(...)` was
    a function before `push` became a module of the hub package, and keeps working."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule
