"""One typed config for a training run: `TrainConfig`, whose settings are the options of `qlora_lite.options`.

Every option is a keyword of `train()` and (where its declaration says so) a CLI flag. Planner knobs default
to None, meaning "let the planner choose"; a value the user sets stays fixed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from typing import Any

from qlora_lite.errors import UserError
from qlora_lite.model.peft_methods import PeftSettings
from qlora_lite.options import (  # noqa: F401 (re-exported: the names callers used before options.py)
    OPTIONS,
    PLANNER_KNOBS,
    RESUME_MODES,
    SCHEDULERS,
    peft_fields,
    planner_settings,
    problems,
)


def peft_settings(settings: dict[str, Any]) -> PeftSettings:
    """The PEFT method options among `settings` (rank and targets are filled from the plan before attaching)."""
    return PeftSettings(**{k: v for k, v in peft_fields(settings).items() if v is not None})


# Fields that are not settings: where things are, and live objects.
_NOT_SETTINGS = ("model", "data", "output_dir", "callbacks", "hardware", "progress")


class _TrainConfigMethods:
    def fixed_knobs(self) -> dict[str, Any]:
        """The planner knobs the user set (everything else the planner fills in), and the PEFT method."""
        return {**planner_settings(self.settings()), "peft": self.peft_settings()}

    def peft_settings(self) -> PeftSettings:
        return peft_settings(self.settings())

    def settings(self) -> dict[str, Any]:
        """Every option's value, by name."""
        return {option.name: getattr(self, option.name) for option in OPTIONS}

    def to_record(self) -> dict[str, Any]:
        """JSON-able: the inputs and every setting, as `qlora-lite resume` needs them."""
        data = self.data if isinstance(self.data, str) else None
        hardware = self.hardware if isinstance(self.hardware, str) else None
        return {
            "model": self.model,
            "data": data,
            "output_dir": self.output_dir,
            "hardware": hardware,
            "settings": self.settings(),
        }

    def validate(self) -> None:
        """Collect every problem, then raise once."""
        found = problems(self.settings())
        if not found:  # the method's own rules (e.g. DoRA needs LoRA) once every value has the right type
            found = self.peft_settings().problems()
        if isinstance(self.checkpoint_dir, str) and not self.checkpoint_dir.startswith("hf://"):
            from qlora_lite.checkpoint.durable import check_drive_path

            try:
                check_drive_path(self.checkpoint_dir)  # Drive not mounted: refused before anything is written
            except UserError as exc:
                found.append(str(exc))
        if found:
            raise UserError("invalid training settings: " + "; ".join(found))


def _fields() -> list[tuple]:
    where = [("model", str), ("data", Any), ("output_dir", str)]
    settings = [(o.name, Any, field(default=o.default)) for o in OPTIONS]
    behaviour = [
        # None: detect; a profile name ("t4") or a HardwareProfile to plan for
        ("hardware", Any, field(default=None)),
        ("progress", bool, field(default=True)),
        ("callbacks", list, field(default_factory=list)),
    ]
    return where + settings + behaviour


def _doc() -> str:
    lines = ["TrainConfig(model, data, output_dir, **settings): the settings of one training run.", ""]
    lines += [f"{o.name} = {o.default!r}: {o.help}" for o in OPTIONS]
    lines += [
        "hardware = None: detect; a profile name ('t4') or a HardwareProfile",
        "progress = True",
        "callbacks = []",
    ]
    return "\n".join(lines)


# Generated from the options declaration, so a new option is one entry in qlora_lite/options.py.
TrainConfig = dataclasses.make_dataclass("TrainConfig", _fields(), bases=(_TrainConfigMethods,))
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = _doc()


def make_config(model: str, data: Any, output_dir: str, **overrides: Any) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(
            f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names - {'model', 'data', 'output_dir'}))}"
        )
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    config = TrainConfig(model=str(model), data=data, output_dir=str(output_dir), **overrides)
    config.validate()
    return config
