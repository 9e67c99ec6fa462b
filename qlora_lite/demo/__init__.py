"""The built-in demos on real small models (SmolLM2-135M, all-MiniLM-L6-v2)."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # names the old flat module of this name had: see qlora_lite.compat
    from qlora_lite.compat import forward

    return forward(__name__, name)
