"""Never lose work, round 2: run identity, fresh starts that keep the older run, per-run durable places,
Drive that is not mounted, a durable place that cannot be listed, and one process per run folder."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qlora_lite
from qlora_lite.checkpoint.durable import FolderBackend, _make_folders_below
from qlora_lite.checkpoint.manifest import CheckpointInfo, verify_checkpoint
from qlora_lite.checkpoint.resume import run_identity
from qlora_lite.checkpoint.store import CheckpointStore
from qlora_lite.config import make_config
from qlora_lite.errors import UserError
from qlora_lite.run_files import ORIGIN_FILE

ROWS = [{"instruction": f"Say the number {i}", "output": f"The number is {i}, yes."} for i in range(24)]
SETTINGS = dict(
    max_steps=6,
    effective_batch_size=4,
    micro_batch_size=2,
    lora_r=4,
    seed=3,
    progress=False,
    save_every_steps=2,
)


class Crash:
    """Stops the run with an error at the end of optimizer step `at` (a VM dying, minus the signal)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, state) -> None:
        if state.step == self.at:
            raise RuntimeError(f"crash at step {state.step}")


def crash_at(step: int, model, data, out, **settings) -> None:
    with pytest.raises(RuntimeError, match="crash at step"):
        qlora_lite.train(model, data, out, callbacks=[Crash(step)], **{**SETTINGS, **settings})


def checkpoints(folder: Path) -> list[str]:
    return (
        sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))
        if folder.is_dir()
        else []
    )


def same_adapter(a: Path, b: Path) -> bool:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must equal."""
    return qlora_lite.train(tiny_model, ROWS, tmp_path_factory.mktemp("ref") / "run", **SETTINGS).output_dir


# ------------------------------------------------------------------------------------- 1. run identity


def hub_copy(tiny_model: str, folder: Path, hub_id: str) -> str:
    """The same weights in another folder, recorded as converted from Hub model `hub_id`."""
    shutil.copytree(tiny_model, folder)
    (folder / ORIGIN_FILE).write_text(json.dumps({"hub_id": hub_id}))
    return str(folder)


def test_run_identity_names_the_hub_model_and_its_commit():
    config = make_config("m", ROWS, "out")
    base = {"hub_id": "Qwen/Qwen2.5-0.5B-Instruct", "revision": "a" * 40, "config_sha256": "c" * 64}
    same = run_identity(config, base, "fp")
    assert run_identity(config, {**base, "path": "/elsewhere"}, "fp") == same  # paths differ between machines
    assert (
        run_identity(config, {**base, "hub_id": "Qwen/Qwen2.5-0.5B"}, "fp") != same
    )  # same commit, other id
    assert run_identity(config, {**base, "revision": "b" * 40}, "fp") != same  # the commit


def test_a_rerun_against_another_hub_model_is_refused(tiny_model, tmp_path):
    instruct = hub_copy(tiny_model, tmp_path / "instruct", "Org/Model-Instruct")
    base = hub_copy(tiny_model, tmp_path / "base", "Org/Model")
    out = tmp_path / "run"
    crash_at(3, instruct, ROWS, out)
    saved = checkpoints(out / "checkpoints")
    assert saved == ["checkpoint-000002"]
    with pytest.raises(UserError, match=r"different run.*hub_id"):
        qlora_lite.train(base, ROWS, out, **SETTINGS)
    assert checkpoints(out / "checkpoints") == saved  # refused before anything changed
    assert qlora_lite.train(instruct, ROWS, out, **SETTINGS).resumed_from_step == 2
    with pytest.raises(UserError, match="different finished run"):  # not handed back as the other model's
        qlora_lite.train(base, ROWS, out, **SETTINGS)


# ------------------------------------------------------------------------ 2. resume="never" keeps both


def test_resume_never_moves_the_older_run_aside_and_auto_continues_the_new_run(
    tiny_model, tmp_path, reference
):
    out = tmp_path / "run"
    crash_at(5, tiny_model, ROWS, out, max_steps=12, learning_rate=1e-3)  # an older, longer run: 2 and 4
    crash_at(3, tiny_model, ROWS, out, resume="never")  # afresh: its checkpoint 2 must survive
    assert checkpoints(out / "checkpoints") == ["checkpoint-000002"]
    archived = [p for p in (out / "checkpoints").iterdir() if p.name.startswith("archived-")]
    assert len(archived) == 1 and checkpoints(archived[0]) == ["checkpoint-000002", "checkpoint-000004"]
    result = qlora_lite.train(tiny_model, ROWS, out, **SETTINGS)  # auto: the new run, not the old one
    assert result.resumed_from_step == 2
    assert same_adapter(out, reference)


def test_rotation_never_removes_the_checkpoint_just_saved_next_to_higher_numbered_ones(tmp_path):
    old = CheckpointStore(tmp_path, keep=2, run_id="old")
    for step in (8, 9):
        old.save(step, {"a.bin": b"old"}, {})
    new = CheckpointStore(tmp_path, keep=2, run_id="new")
    new.save(1, {"a.bin": b"new"}, {})
    assert checkpoints(tmp_path) == ["checkpoint-000001", "checkpoint-000008", "checkpoint-000009"]


def test_the_copier_does_not_count_a_vanished_checkpoint_as_copied(tmp_path):
    store = CheckpointStore(tmp_path / "local", tmp_path / "drive", background=False)
    info = store.save(1, {"a.bin": b"x"}, {})
    store._copier.submit(info)  # copied once already; now the local folder vanishes before a re-copy
    shutil.rmtree(info.path)
    store._copier.submit(info)
    assert store.last_durable_error is not None and "vanished" in store.last_durable_error
    assert not store.flush()


def test_a_mount_that_vanishes_mid_copy_is_never_rebuilt_on_the_local_disk(tmp_path):
    mount = tmp_path / "drive"
    mount.mkdir()
    away = tmp_path / "drive-away"

    def copy_then_unmount(src: Path, dst: Path) -> None:
        if mount.exists():
            mount.rename(away)  # Drive drops out while the checkpoint's nested files are being written
        shutil.copyfile(src, dst)

    local = CheckpointStore(tmp_path / "local", keep=5)
    info = local.save(1, {"a.bin": b"x", "adapter/adapter_model.safetensors": b"y"}, {})
    backend = FolderBackend(mount / "MyDrive" / "run", copy_file=copy_then_unmount)
    for _ in range(2):  # the failed copy, then the retry
        with pytest.raises(OSError):
            backend.upload(info.path, info.name)
        assert not mount.exists()  # no bare folder where the mount was: the next copy would "succeed" there
    assert not (away / "MyDrive" / "run" / info.name).exists()
    with pytest.raises(FileNotFoundError):  # the helper the upload uses never creates its top folder
        _make_folders_below(mount / "gone", Path("adapter/sub"))
    assert not mount.exists()


# --------------------------------------------------------------------- 3. durable places tell runs apart


def test_rotation_in_a_shared_durable_place_touches_only_verified_checkpoints_of_this_run(tmp_path):
    drive = tmp_path / "drive"
    with CheckpointStore(tmp_path / "a", drive, keep=1, background=False, run_id="run-a") as a:
        for step in (1, 2):
            a.save(step, {"a.bin": b"a" * 100}, {})
    unfinished = drive / "checkpoint-000003"  # a Drive copy still arriving: no manifest yet
    unfinished.mkdir()
    (unfinished / "a.bin").write_bytes(b"partial")
    with CheckpointStore(tmp_path / "b", drive, keep=1, background=False, run_id="run-b") as b:
        for step in (10, 11, 12):
            b.save(step, {"a.bin": b"b" * 100}, {})
    assert checkpoints(drive) == ["checkpoint-000002", "checkpoint-000003", "checkpoint-000012"]


def test_a_durable_copy_never_replaces_another_runs_checkpoint_of_the_same_step(tmp_path):
    drive = tmp_path / "drive"
    with CheckpointStore(tmp_path / "a", drive, background=False, run_id="run-a") as a:
        a.save(2, {"a.bin": b"first run"}, {})
    with CheckpointStore(tmp_path / "b", drive, background=False, run_id="run-b") as b:
        b.save(2, {"a.bin": b"second run"}, {})
        assert "belongs to another run" in b.last_durable_error
    assert (drive / "checkpoint-000002" / "a.bin").read_bytes() == b"first run"


def test_two_runs_with_the_same_output_name_on_one_drive_keep_both(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LITE_DRIVE_ROOT", str(tmp_path / "MyDrive"))
    (tmp_path / "MyDrive").mkdir()
    durable = tmp_path / "MyDrive" / "qlora_lite" / "run"
    first = qlora_lite.train(tiny_model, ROWS, tmp_path / "vm-1" / "run", **SETTINGS)
    assert checkpoints(durable) == ["checkpoint-000004", "checkpoint-000006"]
    other_data = ROWS[:20]
    with pytest.raises(UserError, match="different run"):  # the quickstart again, other data, same name
        qlora_lite.train(tiny_model, other_data, tmp_path / "vm-2" / "run", **SETTINGS)
    second = qlora_lite.train(tiny_model, other_data, tmp_path / "vm-2" / "run", overwrite=True, **SETTINGS)
    assert second.resumed_from_step is None
    assert checkpoints(durable) == ["checkpoint-000004", "checkpoint-000006"]  # the second run's
    archived = [p for p in durable.iterdir() if p.name.startswith("archived-")]
    assert len(archived) == 1 and checkpoints(archived[0]) == ["checkpoint-000004", "checkpoint-000006"]
    kept = verify_checkpoint(archived[0] / "checkpoint-000006", "durable")
    assert isinstance(kept, CheckpointInfo)
    assert kept.metadata["identity"] == json.loads((first.run_record).read_text())["identity"]


# ---------------------------------------------------------------------------- 4. Drive not mounted


def test_a_mount_point_is_told_from_a_plain_folder(tmp_path):
    from qlora_lite.checkpoint.durable import is_mount_point

    assert is_mount_point("/") and is_mount_point("/proc")
    assert not is_mount_point(tmp_path)


@pytest.fixture
def colab_without_drive(tmp_path, monkeypatch) -> Path:
    """/content exists, /content/drive is a plain folder (no FUSE mount): what a VM shows before drive.mount."""
    mount = tmp_path / "content" / "drive"
    monkeypatch.setenv("QLORA_LITE_DRIVE_MOUNT", str(mount))
    monkeypatch.setenv("QLORA_LITE_DRIVE_ROOT", str(mount / "MyDrive"))
    (tmp_path / "content").mkdir()
    return mount


def test_a_drive_path_is_refused_while_drive_is_not_mounted(
    tiny_model, tmp_path, colab_without_drive, capsys
):
    from qlora_lite.cli.main import main

    target = colab_without_drive / "MyDrive" / "runs" / "x"
    with pytest.raises(UserError, match="not mounted"):
        qlora_lite.train(tiny_model, ROWS, tmp_path / "run", checkpoint_dir=str(target), **SETTINGS)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = ["train", "--model", tiny_model, "--data", str(data), "--output", str(tmp_path / "run2")]
    assert main([*argv, "--checkpoint-dir", str(target), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not mounted" in err[0] and "drive.mount" in err[0]
    assert not colab_without_drive.exists()  # nothing written into the bare mount point
    (colab_without_drive / "MyDrive").mkdir(parents=True)  # a folder there is still not a mount
    with pytest.raises(UserError, match="not mounted"):
        FolderBackend(target)
    assert not (colab_without_drive / "MyDrive" / "runs").exists()


def test_notebooks_refuse_drive_when_it_is_not_mounted(colab_without_drive):
    from qlora_lite import notebook

    (colab_without_drive / "MyDrive").mkdir(parents=True)  # a bare folder where Drive would be
    with pytest.raises(UserError, match="not mounted"):
        notebook.setup_colab("run", checkpoint_to="drive", allow_cpu=True)
    with pytest.raises(UserError, match="not mounted"):
        notebook.setup_colab("run", checkpoint_to=str(colab_without_drive / "MyDrive" / "x"), allow_cpu=True)
    assert notebook.setup_colab("run", checkpoint_to="auto", allow_cpu=True).checkpoint_dir is None


# ----------------------------------------------------------------- 5. a durable place that cannot be listed


class Unlistable(FolderBackend):
    def list(self):
        raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")


def test_a_failed_listing_at_start_is_an_error_and_local_resume_is_explicit(tmp_path):
    CheckpointStore(tmp_path / "local").save(3, {"a.bin": b"x"}, {})
    store = CheckpointStore(tmp_path / "local", backend=Unlistable(tmp_path / "drive"), background=False)
    with pytest.raises(UserError, match=r"cannot list.*ENOTCONN.*resume='local'"):
        store.latest()
    assert store.latest(durable=False).step == 3


def test_qlora_lite_resume_works_on_a_fresh_machine_from_the_durable_place_alone(
    tiny_model, tmp_path, reference, capsys
):
    from qlora_lite.cli.main import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out, drive = tmp_path / "vm" / "run", tmp_path / "drive" / "run"
    crash_at(5, tiny_model, str(data), out, checkpoint_dir=str(drive))
    shutil.rmtree(tmp_path / "vm")  # the VM and its disk are gone
    assert main(["resume", str(out), "--checkpoint-dir", str(drive), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["resumed_from_step"] == 4 and printed["steps"] == 6
    assert same_adapter(out, reference)


# ------------------------------------------------------------------------------- 7. one process per run


def test_a_second_process_on_a_locked_run_exits_2_and_the_first_finishes_unharmed(
    tiny_model, tmp_path, reference
):
    import os
    import subprocess
    import sys
    import time

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    job = {"model": tiny_model, "data": str(data), "out": str(out), "settings": SETTINGS, "pause_at_step": 3}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    worker = str(Path(__file__).with_name("train_worker.py"))
    first = subprocess.Popen(
        [sys.executable, worker, json.dumps({**job, "pause_dir": str(gate)})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not (gate / "paused").exists():  # the first run holds the folder, mid-run
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        argv = ["train", "--model", tiny_model, "--data", str(data), "--output", str(out), "--no-progress"]
        second = subprocess.run(
            [sys.executable, "-m", "qlora_lite", *argv, "--max-steps", "6", "--effective-batch-size", "4"],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert "Traceback" not in second.stderr and len(errors) == 1, second.stderr[-3000:]
        assert "in use by process" in errors[0] and str(first.pid) in errors[0], errors
    finally:
        (gate / "go").write_text("")
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["metrics"]["steps"] == 6
    x, y = load_file(out / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    for key in y:  # unharmed: the uninterrupted result (another process: thread counts may differ)
        torch.testing.assert_close(x[key], y[key], rtol=1e-4, atol=1e-6)
    assert checkpoints(out / "checkpoints") == ["checkpoint-000004", "checkpoint-000006"]


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    from qlora_lite.checkpoint.lock import RunLock

    (tmp_path / ".qlora-lite.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started_unix": 0}))
    with RunLock(tmp_path):  # no process holds it (the kernel dropped its flock when it died)
        with pytest.raises(UserError, match=r"in use by process \d+"):
            RunLock(tmp_path).acquire()  # a second cell in the same process is refused too
    with RunLock(tmp_path):
        pass
