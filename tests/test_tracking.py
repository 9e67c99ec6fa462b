"""Tracking: the step-log rows reach TensorBoard (read back with tensorboard's reader), W&B offline, Trackio."""

from __future__ import annotations

import pytest

from qlora_lite.errors import UserError
from qlora_lite.training.tracking import TENSORBOARD_DIR, Trackers, flat_params, parse_report_to, scalars


def read_tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_parse_report_to():
    assert parse_report_to(None) == ()
    assert parse_report_to("none") == ()
    assert parse_report_to("tensorboard, wandb") == ("tensorboard", "wandb")
    assert parse_report_to(["TensorBoard", "tensorboard"]) == ("tensorboard",)
    with pytest.raises(UserError, match="tensorbord is not one of none, tensorboard, wandb, trackio"):
        parse_report_to("tensorbord")
    with pytest.raises(UserError, match="'none' alone"):
        parse_report_to("none,wandb")


def test_rows_become_named_curves_and_params_flatten():
    assert scalars({"step": 3, "loss": 1.5, "eval_loss": 2.0, "micro_batch_size": 4, "note": "x"}) == {
        "train/loss": 1.5,
        "eval/loss": 2.0,
        "train/micro_batch_size": 4.0,
    }
    assert flat_params({"plan": {"micro_batch_size": 2, "targets": ["q", "v"]}, "seed": 1}) == {
        "plan/micro_batch_size": 2,
        "plan/targets": '["q", "v"]',
        "seed": 1,
    }


def test_tensorboard_event_file_holds_the_rows_and_a_resume_replaces_the_lost_steps(tmp_path):
    trackers = Trackers(["tensorboard"], tmp_path, "run")
    trackers.log_params({"learning_rate": 2e-4, "plan": {"micro_batch_size": 2}})
    for step in range(1, 6):
        trackers.log_row({"step": step, "loss": 1.0 / step, "learning_rate": 1e-4})
    trackers.log_row({"step": 5, "eval_loss": 0.75})
    trackers.close()
    curves = read_tensorboard(tmp_path / TENSORBOARD_DIR)
    assert curves["train/loss"] == [(s, round(1.0 / s, 6)) for s in range(1, 6)]
    assert curves["eval/loss"] == [(5, 0.75)]

    # A process killed after step 5 whose last checkpoint was step 3: the resumed run rewrites 4 and 5.
    resumed = Trackers(["tensorboard"], tmp_path, "run", start_step=3)
    for step in (4, 5, 6):
        resumed.log_row({"step": step, "loss": 10.0 + step})
    resumed.close()
    curves = read_tensorboard(tmp_path / TENSORBOARD_DIR)
    assert curves["train/loss"] == [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6)), (4, 14.0), (5, 15.0), (6, 16.0)]


def test_wandb_offline_writes_under_the_run_folder_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers(["wandb"], tmp_path, "my-run")
    trackers.log_params({"seed": 7})
    trackers.log_row({"step": 1, "loss": 2.5})
    run_id = (tmp_path / "wandb" / "run_id").read_text()
    trackers.close()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}")), "no offline run folder for this id"
    again = Trackers(["wandb"], tmp_path, "my-run", start_step=1)
    assert (tmp_path / "wandb" / "run_id").read_text() == run_id
    again.close()


def test_a_tracker_that_fails_mid_run_is_dropped_not_fatal(tmp_path, caplog):
    trackers = Trackers(["tensorboard"], tmp_path, "run")
    trackers.active[0].writer.close()
    trackers.active[0].log_row = lambda row: (_ for _ in ()).throw(OSError("disk gone"))
    trackers.log_row({"step": 1, "loss": 1.0})
    assert trackers.active == []
    assert "tensorboard tracking stopped: disk gone" in caplog.text


def test_trackio_writes_its_database_under_the_run_folder(tmp_path):
    pytest.importorskip("trackio")
    import json
    import sqlite3
    import subprocess
    import sys

    # trackio picks its folder once, at import: a fresh process, as in a real run.
    code = (
        "import sys; from pathlib import Path; from qlora_lite.training.tracking import Trackers\n"
        "t = Trackers(['trackio'], Path(sys.argv[1]), 'r1'); t.log_params({'seed': 3})\n"
        "t.log_row({'step': 1, 'loss': 2.0}); t.log_row({'step': 2, 'loss': 1.0}); t.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, capture_output=True, timeout=120)
    with sqlite3.connect(tmp_path / "trackio" / "qlora-lite.db") as db:
        rows = db.execute("select step, metrics from metrics where run_name = 'r1' order by step").fetchall()
    assert [(step, json.loads(metrics)) for step, metrics in rows] == [
        (1, {"train/loss": 2.0}),
        (2, {"train/loss": 1.0}),
    ]
