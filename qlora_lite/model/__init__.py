"""Load a base model (4/8/16-bit, local folder or Hub id) and attach a PEFT method."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # names the old flat module of this name had: see qlora_lite.compat
    from qlora_lite.compat import forward

    return forward(__name__, name)
