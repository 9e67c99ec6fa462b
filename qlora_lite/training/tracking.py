"""Experiment tracking: the rows of `steps.jsonl` also go to TensorBoard, Weights & Biases or Trackio.

Each tracker is an optional library, used through its own API and imported only when asked for; a missing one
is a UserError naming the extra to install. Local files live under the run folder (`RUN/tensorboard/`,
`RUN/wandb/`), so `%tensorboard --logdir runs/` on Colab shows every run. On resume the trackers continue
from the restored step: TensorBoard discards events past it (`purge_step`), W&B resumes the same run id.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_lite.errors import UserError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
TRACKIO_DIR = "trackio"
# Row keys that are bookkeeping, not curves.
_NOT_SCALARS = ("step",)


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a step-log row, named as curves (train/loss, eval/loss, ...)."""
    out = {}
    for key, value in row.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith("eval_"):
            out["eval/" + key.removeprefix("eval_")] = float(value)
        else:
            out["train/" + key] = float(value)
    return out


def flat_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings/plan -> flat `a/b` keys with plain values (what hparam tables can show)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, name + "/"))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


class Tracker:
    """One backend: parameters once, a row per step/eval, then close."""

    name = "none"

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_row(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


@dataclass
class TensorBoardTracker(Tracker):
    run_dir: Path
    start_step: int = 0
    name = "tensorboard"

    def __post_init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UserError(
                "--report-to tensorboard needs the tensorboard package: pip install 'qlora-lite[tracking]'"
            ) from exc
        # purge_step: a run resumed after step N drops the events (steps > N) a killed process wrote after it.
        self.writer = SummaryWriter(
            str(self.run_dir / TENSORBOARD_DIR),
            purge_step=self.start_step + 1 if self.start_step else None,
            flush_secs=30,
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in sorted(flat_params(params).items()))
        self.writer.add_text("run/parameters", text, global_step=self.start_step)

    def log_row(self, row: Mapping[str, Any]) -> None:
        for key, value in scalars(row).items():
            self.writer.add_scalar(key, value, global_step=int(row["step"]))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


@dataclass
class WandbTracker(Tracker):
    run_dir: Path
    run_name: str
    start_step: int = 0
    name = "wandb"

    def __post_init__(self) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise UserError("--report-to wandb needs the wandb package: pip install wandb") from exc
        self._wandb = wandb
        (self.run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / WANDB_DIR / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id)
        # One W&B run per qlora_lite run, resumed with it; login/offline mode come from the user's environment.
        self.run = wandb.init(
            dir=str(self.run_dir), id=run_id, name=self.run_name, resume="allow", project="qlora-lite"
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(flat_params(params), allow_val_change=True)

    def log_row(self, row: Mapping[str, Any]) -> None:
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


@dataclass
class TrackioTracker(Tracker):
    run_dir: Path
    run_name: str
    start_step: int = 0
    name = "trackio"

    def __post_init__(self) -> None:
        import os
        import sys

        if "trackio" not in sys.modules:  # trackio reads its folder once, at import
            os.environ.setdefault("TRACKIO_DIR", str(self.run_dir / TRACKIO_DIR))
        try:
            import trackio
        except ImportError as exc:
            raise UserError("--report-to trackio needs the trackio package: pip install trackio") from exc
        self._trackio = trackio
        self.run = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        # trackio takes the config when a run starts: start it here, with the parameters.
        self.run = self._trackio.init(
            project="qlora-lite", name=self.run_name, config=flat_params(params), resume="allow"
        )

    def log_row(self, row: Mapping[str, Any]) -> None:
        if self.run is None:
            self.log_params({})
        self._trackio.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        if self.run is not None:
            self._trackio.finish()


REPORT_TO: dict[str, Callable[[Path, str, int], Tracker]] = {
    "tensorboard": lambda run_dir, name, step: TensorBoardTracker(run_dir, step),
    "wandb": lambda run_dir, name, step: WandbTracker(run_dir, name, step),
    "trackio": lambda run_dir, name, step: TrackioTracker(run_dir, name, step),
}


def parse_report_to(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """`"tensorboard,wandb"`, a list, "none" or None -> the tracker names, checked."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(item.strip().lower() for item in items if item and item.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [n for n in names if n not in REPORT_TO]
    if unknown or "none" in names:
        raise UserError(
            f"report_to {', '.join(unknown or ['none'])!s} is not one of none, {', '.join(REPORT_TO)} "
            "(several may be joined with commas; 'none' alone turns tracking off)"
        )
    return names


class Trackers:
    """Every requested tracker behind one object; a tracker that fails mid-run is logged once and dropped
    (tracking must never stop training)."""

    def __init__(self, names: Iterable[str], run_dir: Path, run_name: str, start_step: int = 0) -> None:
        self.active: list[Tracker] = [REPORT_TO[n](run_dir, run_name, start_step) for n in names]

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker's failure is reported, training goes on
                log.warning("%s tracking stopped: %s", tracker.name, exc)
                self.active.remove(tracker)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each("log_params", params)

    def log_row(self, row: Mapping[str, Any]) -> None:
        self._each("log_row", row)

    def close(self) -> None:
        self._each("close")
        self.active = []
