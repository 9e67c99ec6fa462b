"""Workarounds for upstream behaviour, each in one place with the versions it applies to and when it can go.

Nothing else in the package patches a library; a workaround that is no longer needed is deleted here alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib import metadata
from typing import Any

# ------------------------------------------------------------------ bitsandbytes: CPU inference repacking

# bitsandbytes >= 0.48 repacks a Linear4bit's weight for an AVX512-BF16 kernel the first time it runs in eval
# mode without grad on CPU, and keeps it so: later training steps then go through `gemv_4bit`, which has no
# autograd, and the gradients reaching LoRA layers below it are silently wrong. Evaluation inside a training
# run triggers exactly that. DoRA inference breaks the same way: its weight norms dequantize the repacked bytes
# (plain PEFT logits off by ~0.1 on a tiny model), so DoRA adapters load with the guard on too. Can go when bitsandbytes undoes the packing on `.train()` (set the version here).
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
