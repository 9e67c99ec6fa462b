"""`qlora-lite serve --print-vllm`: the `vllm serve` command that serves the same base and adapters.

Serving beyond one machine, at high throughput, is vLLM's job; this writes the command (reading only the
adapters' small config files, never loading weights) and says, per adapter, whether vLLM will take it.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlora_lite.errors import UserError

VLLM_DEFAULT_MAX_LORA_RANK = 16  # vLLM refuses adapters above --max-lora-rank, whose default is 16


def _adapter_config(path: str) -> dict[str, Any] | None:
    config = Path(path) / "adapter_config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def _record(path: str) -> dict[str, Any]:
    from qlora_lite.model.loading import read_run_record

    return (read_run_record(path) if Path(path).is_dir() else None) or {}


def base_for_vllm(model: str | None, adapters: Mapping[str, str]) -> str:
    """The base as another machine can name it: --model as given, else the adapters' recorded Hub id."""
    if model:
        return model
    from qlora_lite.hub.card import base_hub_id

    for path in adapters.values():
        record = _record(path)
        hub_id = base_hub_id(record) if record else None
        config = _adapter_config(path) or {}
        found = hub_id or config.get("base_model_name_or_path")
        if found:
            return str(found)
    raise UserError("no adapter names its base model: give --model BASE (a Hub id, for another machine)")


def vllm_command(base: str, adapters: Mapping[str, str]) -> str:
    """`vllm serve BASE --enable-lora --lora-modules name=path ...` with the flags these adapters need."""
    ranks = [int((_adapter_config(p) or {}).get("r", 0)) for p in adapters.values()]
    parts = ["vllm", "serve", base]
    if adapters:
        parts += ["--enable-lora", "--lora-modules"]
        parts += [f"{name}={_portable(path)}" for name, path in adapters.items()]
        parts += ["--max-loras", str(len(adapters))]
        if max(ranks, default=0) > VLLM_DEFAULT_MAX_LORA_RANK:
            parts += ["--max-lora-rank", str(_next_supported_rank(max(ranks)))]
    return " ".join(shlex.quote(p) for p in parts)


def _portable(path: str) -> str:
    # A local folder is given absolute (vLLM runs elsewhere in the shell); a Hub id is kept as is.
    return str(Path(path).resolve()) if os.path.isdir(path) else path


def _next_supported_rank(rank: int) -> int:
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):  # the values vLLM's --max-lora-rank accepts
        if rank <= allowed:
            return allowed
    return rank


def compatibility(adapters: Mapping[str, str]) -> list[str]:
    """One line per adapter: vLLM's verdict and its reasons (the report of `qlora-lite adapters inspect`)."""
    from qlora_lite.inference.portability import adapter_report

    lines = []
    for name, path in adapters.items():
        verdict = adapter_report(path)["vllm"]
        text = "vLLM accepts it" if verdict["ok"] else "vLLM refuses it: " + "; ".join(verdict["reasons"])
        lines.append(f"{name}: {text}" + "".join(f" (note: {n})" for n in verdict["notes"]))
    return lines


def print_vllm(model: str | None, adapters: Mapping[str, str]) -> str:
    """The command and the compatibility lines, as `qlora-lite serve --print-vllm` prints them."""
    base = base_for_vllm(model, adapters)
    lines = [vllm_command(base, adapters)]
    if adapters:
        lines += ["", "# compatibility with vLLM's LoRA serving:"]
        lines += [f"#   {line}" for line in compatibility(adapters)]
    lines += ["# Then call it as this server: the same /v1 routes, `model` = an adapter name or the base."]
    return "\n".join(lines)
