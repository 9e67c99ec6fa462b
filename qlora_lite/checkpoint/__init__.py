"""Never lose work: atomic verified checkpoints, durable places, background copier, resume state, run listing."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # names the old flat module of this name had: see qlora_lite.compat
    from qlora_lite.compat import forward

    return forward(__name__, name)
