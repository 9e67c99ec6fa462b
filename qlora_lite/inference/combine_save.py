"""Combine adapter folders (run folders or Hub ids on one base) into a new adapter folder that loads with PEFT.

The inputs are loaded in an AdapterSet (so they are checked for one base), combined with the guards of
`combine.py`, and the result is saved with a small run record naming its inputs and method.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qlora_lite.errors import UserError
from qlora_lite.inference.adapters import AdapterSet
from qlora_lite.inference.combine import METHODS, add_combined
from qlora_lite.run_files import RUN_RECORD


def combine_adapters(
    adapters: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    method: str = "cat",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    model: str | None = None,
) -> Path:
    """Combine adapters (run folders or Hub ids, same base) into a new adapter folder that loads with PEFT."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: give a new --output folder")
    names = [f"input{i}" for i in range(len(adapters))]
    if method not in METHODS:
        raise UserError(f"method {method!r} is not one of {', '.join(METHODS)}")
    aset = AdapterSet(model, dict(zip(names, map(str, adapters), strict=True)))
    add_combined(aset.model, names, "combined", method=method, weights=weights, density=density)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        aset.model.save_pretrained(tmp, selected_adapters=["combined"])
        saved = Path(tmp) / "combined"  # PEFT saves a non-default adapter in a subfolder of its name
        out.mkdir(parents=True, exist_ok=True)
        for item in saved.iterdir():
            shutil.move(str(item), out / item.name)
    first = aset.source(names[0])  # the first input names the base of the result
    aset.tokenizer_for(names[0]).save_pretrained(out)
    record = {
        "qlora_lite_run": 1,
        "task": "causal_lm",
        "base_model": first.base_identity,
        "plan": {
            k: v for k, v in first.plan.items() if k in ("quantization", "double_quant", "compute_dtype")
        },
        "combined": {
            "method": method,
            "weights": list(weights) if weights is not None else [1.0] * len(names),
            "density": density,
            "inputs": [str(a) for a in adapters],
        },
    }
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return out
