"""What an adapter folder says about itself (task, base, LoRA settings), and whether it fits a given base.

An adapter is a qlora_lite run folder (run record + PEFT files) or a plain PEFT folder (adapter_config.json
only); both are read here, so every consumer (AdapterSet, merge, combine, inspect) asks the same questions.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_lite.errors import UserError
from qlora_lite.model.loading import base_model_of, read_run_record
from qlora_lite.run_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TASKS = {None: "causal_lm", "CAUSAL_LM": "causal_lm", "SEQ_CLS": "classification"}


@dataclass(frozen=True)
class AdapterSource:
    """One adapter on disk: its folder, where it came from, its PEFT config and (for runs) its run record."""

    folder: Path
    source: str  # what the user gave: a path or a Hub id (with @revision)
    config: dict[str, Any]
    record: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def task(self) -> str:
        if self.record and self.record.get("task"):
            return str(self.record["task"])
        return TASKS.get(self.config.get("task_type"), str(self.config.get("task_type")))

    @property
    def base(self) -> str | None:
        """The base model to load for it: the recorded folder when it exists here, else its Hub id."""
        if self.record is None:  # a plain PEFT folder names its base in its config
            return self.config.get("base_model_name_or_path")
        return base_model_of(self.folder, self.record)

    @property
    def base_identity(self) -> dict[str, Any]:
        """{"path", "revision", "config_sha256", "hub_id"} as far as known (plain PEFT folders: the name only);
        an adapter trained on the base LoftQ rewrote adds that base's `loftq_sha256`."""
        own = (self.record or {}).get("loftq_base")
        if own:
            return {"path": self.own_base, "revision": None, "config_sha256": None, "hub_id": None,
                    "loftq_sha256": own["sha256"]}  # fmt: skip
        if self.record and self.record.get("base_model"):
            return dict(self.record["base_model"])
        name = self.config.get("base_model_name_or_path")
        return {"path": name, "revision": self.config.get("revision"), "config_sha256": None, "hub_id": None}

    @property
    def own_base(self) -> str | None:
        """The 4-bit base LoftQ rewrote (more than one iteration), saved beside the adapter: its only base."""
        own = (self.record or {}).get("loftq_base")
        return str(self.folder / own["folder"]) if own else None

    @property
    def plan(self) -> dict[str, Any]:
        return dict((self.record or {}).get("plan", {}))

    @property
    def quantization(self) -> str | None:
        """The base's quantization during training ("nf4", "int8", "none"), None when not recorded."""
        return self.plan.get("quantization")

    def summary(self) -> dict[str, Any]:
        """The facts a user asks about an adapter (AdapterSet.info, `adapters inspect`)."""
        cfg = self.config
        targets = cfg.get("target_modules")
        weights = self.folder / ADAPTER_WEIGHTS
        return {
            "task": self.task,
            "source": self.source,
            "folder": str(self.folder),
            "base": self.base,
            "peft_type": cfg.get("peft_type"),
            "rank": cfg.get("r"),
            "alpha": cfg.get("lora_alpha"),
            "targets": sorted(targets) if isinstance(targets, list) else targets,
            "modules_to_save": cfg.get("modules_to_save"),
            "use_dora": bool(cfg.get("use_dora")),
            "use_rslora": bool(cfg.get("use_rslora")),
            "rank_pattern": cfg.get("rank_pattern") or {},
            "alpha_pattern": cfg.get("alpha_pattern") or {},
            "bias": cfg.get("bias", "none"),
            "quantization": self.quantization,
            "own_base": self.own_base,
            "size_bytes": weights.stat().st_size if weights.is_file() else None,
        }


def read_adapter(path_or_id: str | os.PathLike, revision: str | None = None) -> AdapterSource:
    """A local adapter folder, or a Hub id downloaded to the cache; UserError when it is not a PEFT adapter."""
    from qlora_lite.hub.push import resolve_adapter

    folder = resolve_adapter(path_or_id, revision)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise UserError(
            f"{folder} holds no {ADAPTER_CONFIG}: give a run folder written by qlora-lite train or a PEFT adapter"
        )
    source = str(path_or_id) + (f"@{revision}" if revision else "")
    return AdapterSource(folder, source, json.loads(config_path.read_text()), read_run_record(folder))


def base_mismatch(adapter: AdapterSource, base: dict[str, Any]) -> str | None:
    """Why `adapter` was not trained on `base` (an identity as `model_identity` gives), or None if it was.

    Same local revision hash, same Hub id (and commit when both know it), same path, or the same config
    hash all count as the same base; a different config hash or commit is a different one."""
    mine = adapter.base_identity
    if mine.get("loftq_sha256") or base.get("loftq_sha256"):  # a base LoftQ rewrote matches itself only
        if mine.get("loftq_sha256") == base.get("loftq_sha256"):
            return None
        here = base.get("hub_id") or base.get("path")
        if mine.get("loftq_sha256"):
            return f"it was trained on its own 4-bit base {mine['path']} (LoftQ rewrote it) and this base is {here}"
        return f"this base is the 4-bit base another run's LoftQ rewrote, and it was trained on {mine.get('path')}"
    if mine.get("revision") and mine.get("revision") == base.get("revision"):
        return None
    trained = mine.get("hub_id") or mine.get("path")
    here = base.get("hub_id") or base.get("path")
    if mine.get("config_sha256") and base.get("config_sha256"):
        if mine["config_sha256"] != base["config_sha256"]:
            return f"it was trained on {trained} (another config.json) and this base is {here}"
        return None
    both_hub = mine.get("hub_id") and mine.get("hub_id") == base.get("hub_id")
    if both_hub:
        a, b = mine.get("revision"), base.get("revision")
        if a and b and not a.startswith("local-") and not b.startswith("local-") and a != b:
            return f"it was trained on {trained} at commit {a} and this base is at commit {b}"
        return None
    names = {str(v) for v in (base.get("path"), base.get("hub_id")) if v}
    if mine.get("path") is None and mine.get("hub_id") is None:
        return None  # a plain PEFT folder that names no base: PEFT's shape checks are all there is
    if _same_path(mine.get("path"), base.get("path")) or {mine.get("path"), mine.get("hub_id")} & names:
        return None
    return f"it was trained on {trained} and this base is {here}"


def _same_path(a: Any, b: Any) -> bool:
    if not a or not b:
        return False
    pa, pb = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def has_tokenizer(folder: Path) -> bool:
    """Whether a folder holds a saved tokenizer (run folders do; plain PEFT folders often do not)."""
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
