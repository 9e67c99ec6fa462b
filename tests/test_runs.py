"""`qlora-lite runs`: run folders found, last verified step, finished or not, durable location."""

from __future__ import annotations

import json
import time

import pytest

from qlora_lite.checkpoint.runs import format_runs, list_runs
from qlora_lite.checkpoint.store import CheckpointStore
from qlora_lite.errors import UserError


def _save(root, step, metadata=None):
    CheckpointStore(root, keep=5).save(step, {"adapter.safetensors": b"w" * 100 * step}, metadata or {})


def test_list_runs_reports_verified_steps_finished_runs_and_durable_places(tmp_path):
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "run_record.json").write_text(json.dumps({"created_unix": 1_700_000_000}))
    interrupted = tmp_path / "interrupted"
    _save(interrupted / "checkpoints", 10, {"durable_root": "/content/drive/MyDrive/qlora_lite/interrupted"})
    _save(interrupted / "checkpoints", 20, {"durable_root": "/content/drive/MyDrive/qlora_lite/interrupted"})
    (interrupted / "checkpoints" / "checkpoint-000020" / "adapter.safetensors").write_bytes(b"cut")
    drive_copy = tmp_path / "on-drive"  # a durable root: checkpoint-* folders directly inside
    _save(drive_copy, 7)
    (tmp_path / "notes").mkdir()  # not a run
    (tmp_path / "stray.txt").write_text("x")

    runs = {r.name: r for r in list_runs(tmp_path)}
    assert set(runs) == {"finished", "interrupted", "on-drive"}
    assert runs["finished"].finished and runs["finished"].last_step is None
    assert runs["finished"].last_written_unix == 1_700_000_000
    broken = runs["interrupted"]
    assert not broken.finished and broken.last_step == 10  # 20 is truncated: not verified
    assert broken.durable_root == "/content/drive/MyDrive/qlora_lite/interrupted"
    assert len(broken.problems) == 1 and "checkpoint-000020" in broken.problems[0]
    assert "truncated copy?" in broken.problems[0]
    assert abs(broken.last_written_unix - time.time()) < 60
    assert runs["on-drive"].last_step == 7 and runs["on-drive"].durable_root is None

    assert [r.name for r in list_runs(interrupted)] == ["interrupted"]  # a run folder itself

    table = format_runs(list(runs.values()), now=time.time() + 7200)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "last", "verified"]
    row = next(line for line in lines if line.startswith("interrupted "))
    assert " 10 " in row and "2.0 h ago" in row and " no " in row and "MyDrive/qlora_lite/interrupted" in row
    assert any(line.startswith("finished ") and " yes" in line for line in lines)
    assert any("interrupted: skipped checkpoint-000020" in line for line in lines)
    assert format_runs([]) == "no runs found"


def test_list_runs_of_a_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        list_runs(tmp_path / "nope")
