"""`qlora-lite runs`: the runs under a folder, each with its last verified checkpoint.

A run folder holds `run_record.json` (written when training finished) and/or a `checkpoints/` folder
managed by the checkpoint store. A durable copy laid out as a bare folder of `checkpoint-*` folders
counts as a run too, so the same listing works on a Drive folder after the VM is gone.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from qlora_lite.checkpoint.manifest import CheckpointInfo, SkippedCheckpoint, step_of, verify_checkpoint
from qlora_lite.errors import UserError
from qlora_lite.run_files import CHECKPOINTS  # noqa: F401
from qlora_lite.training.record import RUN_RECORD


@dataclass(frozen=True)
class RunSummary:
    """One run as `qlora-lite runs` shows it."""

    name: str
    path: Path
    last_step: int | None  # newest checkpoint that verifies against its manifest
    last_written_unix: float | None  # when that checkpoint (or, without one, the run record) was written
    finished: bool  # run_record.json is present
    durable_root: str | None  # where checkpoints are copied, when recorded
    problems: tuple[str, ...] = ()  # newer checkpoints that did not verify, unreadable record, ...


def _checkpoint_folder(path: Path) -> Path | None:
    if (path / CHECKPOINTS).is_dir():
        return path / CHECKPOINTS
    if any(step_of(p.name) is not None for p in path.iterdir() if p.is_dir()):
        return path
    return None


def is_run_dir(path: Path) -> bool:
    """True for a folder holding a run record, a checkpoints/ folder, or checkpoint-* folders."""
    return path.is_dir() and ((path / RUN_RECORD).is_file() or _checkpoint_folder(path) is not None)


def newest_verified(folder: Path) -> tuple[CheckpointInfo | None, list[SkippedCheckpoint]]:
    """The newest checkpoint in `folder` that verifies, and the newer ones skipped on the way."""
    names = [p.name for p in folder.iterdir() if step_of(p.name) is not None and p.is_dir()]
    skipped: list[SkippedCheckpoint] = []
    for name in sorted(names, key=step_of, reverse=True):
        checked = verify_checkpoint(folder / name)
        if isinstance(checked, CheckpointInfo):
            return checked, skipped
        skipped.append(checked)
    return None, skipped


def summarize_run(path: str | Path) -> RunSummary:
    """Read one run folder (verifying checkpoints newest first until one verifies)."""
    path = Path(path)
    problems: list[str] = []
    record: dict = {}
    if (path / RUN_RECORD).is_file():
        try:
            record = json.loads((path / RUN_RECORD).read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{RUN_RECORD} is unreadable ({exc})")
    folder = _checkpoint_folder(path)
    info, skipped = newest_verified(folder) if folder is not None else (None, [])
    problems += [f"skipped {s.name}: {s.reason}" for s in skipped]
    durable = (info.metadata.get("durable_root") if info else None) or record.get("durable_root")
    written = info.written_unix if info else record.get("created_unix")
    return RunSummary(
        name=path.name,
        path=path,
        last_step=info.step if info else None,
        last_written_unix=float(written) if written is not None else None,
        finished=(path / RUN_RECORD).is_file(),
        durable_root=str(durable) if durable else None,
        problems=tuple(problems),
    )


def list_runs(root: str | Path) -> list[RunSummary]:
    """The runs in `root`: `root` itself if it is a run, and each run folder directly inside it."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(
            f"{root} is not a folder: give the folder that holds your runs (the --output of train)"
        )
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [summarize_run(p) for p in candidates if is_run_dir(p) and p.name != CHECKPOINTS]


def _when(unix: float | None, now: float) -> str:
    if unix is None:
        return "-"
    age = max(0.0, now - unix)
    if age < 60:
        ago = f"{age:.0f} s ago"
    elif age < 3600:
        ago = f"{age / 60:.0f} min ago"
    elif age < 2 * 86400:
        ago = f"{age / 3600:.1f} h ago"
    else:
        ago = f"{age / 86400:.0f} days ago"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(unix))} ({ago})"


def format_runs(runs: list[RunSummary], now: float | None = None) -> str:
    """A plain-text table of runs, one line each, plus a line per problem found."""
    if not runs:
        return "no runs found"
    now = time.time() if now is None else now
    header = ("run", "last verified step", "written", "finished", "durable copy")
    rows = [
        (
            r.name,
            "-" if r.last_step is None else str(r.last_step),
            _when(r.last_written_unix, now),
            "yes" if r.finished else "no",
            r.durable_root or "-",
        )
        for r in runs
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    for run in runs:
        lines += [f"  {run.name}: {problem}" for problem in run.problems]
    return "\n".join(lines)
