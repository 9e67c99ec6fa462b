"""The checkpoint store on a real file system: atomic publish, verification, rotation, durable copy, faults,
and SIGKILL at random moments. Faults are injected only through FolderBackend's `copy_file` and writers."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qlora_lite.checkpoint.durable import copy_file_fsync
from qlora_lite.checkpoint.manifest import FORMAT_VERSION, MANIFEST, verify_checkpoint
from qlora_lite.checkpoint.store import (
    CheckpointInfo,
    CheckpointStore,
    CorruptCheckpointError,
    FolderBackend,
    SkippedCheckpoint,
    default_durable_root,
)
from qlora_lite.errors import UserError


def payload(step: int, index: int, size: int) -> bytes:
    block = hashlib.sha256(f"{step}-{index}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def files_for(step: int, size: int = 20_000) -> dict:
    return {
        "adapter.safetensors": payload(step, 0, size),
        "optimizer.pt": lambda f: f.write(payload(step, 1, 2 * size)),
        "state/rng.json": json.dumps({"step": step}).encode(),
    }


def published(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-")) if root.is_dir() else []


def warnings_about(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


class FaultyCopy:
    """FolderBackend.copy_file that fails on optimizer.pt while `code` is set: OSError(code), or for
    code == "zero" a silent 0-byte file (Drive shows a file before its content has arrived)."""

    def __init__(self, delay: float = 0.0):
        self.code: int | str | None = None
        self.calls = 0
        self.uploads = 0
        self.delay = delay

    def __call__(self, src: Path, dst: Path) -> None:
        self.calls += 1
        if src.name == "adapter.safetensors":
            self.uploads += 1
        if self.code == "zero" and src.name == "optimizer.pt":
            dst.write_bytes(b"")
            return
        if self.code is not None and src.name == "optimizer.pt":
            raise OSError(self.code, os.strerror(self.code), str(dst))
        time.sleep(self.delay)
        copy_file_fsync(src, dst)


# --------------------------------------------------------------------------------------- local store


def test_save_publishes_a_verified_checkpoint_with_manifest_last(tmp_path):
    source = tmp_path / "adapter_model.safetensors"
    source.write_bytes(b"weights")
    store = CheckpointStore(tmp_path / "ckpt")
    info = store.save(120, {**files_for(120), "adapter/model.safetensors": source}, {"examples_seen": 960})
    assert info.path == tmp_path / "ckpt" / "checkpoint-000120" and info.step == 120
    manifest = json.loads((info.path / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["step"] == 120
    assert manifest["metadata"] == {"examples_seen": 960}
    assert manifest["files"]["optimizer.pt"] == {
        "size": 40_000,
        "sha256": hashlib.sha256(payload(120, 1, 40_000)).hexdigest(),
    }
    assert published(tmp_path / "ckpt") == ["checkpoint-000120"]
    assert os.listdir(tmp_path / "ckpt") == ["checkpoint-000120"]  # no staging left behind
    latest = store.latest()
    assert (
        isinstance(latest, CheckpointInfo) and latest.step == 120 and latest.metadata["examples_seen"] == 960
    )
    assert store.read(latest, "optimizer.pt") == payload(120, 1, 40_000)
    assert store.file_path(latest, "adapter/model.safetensors").read_bytes() == b"weights"
    assert CheckpointStore(tmp_path / "nothing-yet").latest() is None


def test_a_crash_while_staging_leaves_no_checkpoint_and_the_earlier_ones_intact(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(1, files_for(1), {})
    store.save(2, files_for(2), {})

    def dies(handle):
        handle.write(b"half of an optimizer")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store.save(3, {**files_for(3), "optimizer.pt": dies}, {})
    assert os.listdir(tmp_path) and published(tmp_path) == ["checkpoint-000001", "checkpoint-000002"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert store.latest().step == 2
    assert all(isinstance(verify_checkpoint(tmp_path / n), CheckpointInfo) for n in published(tmp_path))


def test_a_full_local_disk_is_a_user_error_naming_the_folder(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(1, files_for(1), {})

    def disk_full(handle):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match=r"ckpt is full .*optimizer.pt of checkpoint-000002.*free space"):
        store.save(2, {**files_for(2), "optimizer.pt": disk_full}, {})
    assert published(tmp_path / "ckpt") == ["checkpoint-000001"] and store.latest().step == 1
    with pytest.raises(TypeError):  # metadata that JSON cannot hold fails before anything is written
        store.save(3, files_for(3), {"bad": object()})
    assert published(tmp_path / "ckpt") == ["checkpoint-000001"]


def _corrupt_set(root: Path) -> None:
    """checkpoint 1 good; 2 truncated; 3 no manifest; 4 manifest/file mismatch; 5 newer format; 6 staging."""
    store = CheckpointStore(root, keep=10)
    for step in range(1, 6):
        store.save(step, files_for(step), {})
    opt = root / "checkpoint-000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:1000])
    (root / "checkpoint-000003" / MANIFEST).unlink()
    adapter = root / "checkpoint-000004" / "adapter.safetensors"
    adapter.write_bytes(b"x" * adapter.stat().st_size)  # same size, other bytes
    manifest_path = root / "checkpoint-000005" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest.update(format_version=FORMAT_VERSION + 98, qlora_lite_version="9.9.0")
    manifest_path.write_text(json.dumps(manifest))
    staging = root / f".staging-checkpoint-000006-{2**22 + 12345}-abcd"  # a pid that cannot be alive
    staging.mkdir()
    (staging / "adapter.safetensors").write_bytes(b"partial")


def test_latest_skips_every_bad_checkpoint_with_one_warning_naming_it(tmp_path, caplog):
    _corrupt_set(tmp_path)
    store = CheckpointStore(tmp_path)
    caplog.set_level(logging.WARNING)
    info = store.latest()
    assert info is not None and info.step == 1
    expected = {
        "checkpoint-000002": "optimizer.pt is 1.0 KB, manifest.json says 40.0 KB (truncated copy?)",
        "checkpoint-000003": "no manifest.json",
        "checkpoint-000004": "adapter.safetensors does not match its sha256",
        "checkpoint-000005": "written by qlora_lite 9.9.0 in checkpoint format 99",
        ".staging-checkpoint-000006": "unfinished save",
    }
    for folder, reason in expected.items():
        found = warnings_about(caplog, folder)
        assert len(found) == 1 and reason in found[0], (folder, found)
    assert "upgrade qlora_lite" in warnings_about(caplog, "checkpoint-000005")[0]
    caplog.clear()
    assert store.latest().step == 1 and not warnings_about(caplog, "checkpoint-")  # once per store
    listed = {c.name: c for c in store.list()}
    assert isinstance(listed["checkpoint-000001"], CheckpointInfo)
    assert all(isinstance(listed[n], SkippedCheckpoint) for n in expected if n.startswith("checkpoint"))
    assert any(isinstance(c, SkippedCheckpoint) and c.name.startswith(".staging") for c in store.list())


def test_read_rechecks_the_hash(tmp_path):
    store = CheckpointStore(tmp_path)
    info = store.save(1, files_for(1), {})
    (info.path / "optimizer.pt").write_bytes(b"\0" * 40_000)
    with pytest.raises(CorruptCheckpointError, match="optimizer.pt changed"):
        store.read(info, "optimizer.pt")


def test_rotation_keeps_the_two_newest_verified_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in range(1, 4):
        store.save(step, files_for(step), {})
    assert published(tmp_path) == ["checkpoint-000002", "checkpoint-000003"]
    opt = tmp_path / "checkpoint-000003" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:10])  # the newest is corrupt: it must not count as one of the two
    fresh = CheckpointStore(tmp_path, keep=2)
    fresh.save(4, files_for(4), {})
    assert published(tmp_path) == ["checkpoint-000002", "checkpoint-000003", "checkpoint-000004"]
    fresh.save(5, files_for(5), {})
    assert published(tmp_path) == ["checkpoint-000004", "checkpoint-000005"]
    with pytest.raises(UserError, match="keep"):
        CheckpointStore(tmp_path, keep=0)


# ------------------------------------------------------------------------------------ durable copy


def test_durable_copy_is_verified_rotated_and_used_on_a_fresh_machine(tmp_path):
    local, drive = tmp_path / "vm" / "checkpoints", tmp_path / "drive" / "run"
    with CheckpointStore(local, drive, keep=2) as store:
        for step in range(1, 5):
            store.save(step, files_for(step), {"durable_root": str(drive)})
        assert store.flush(timeout=30)
        assert store.durable_ok and store.last_durable_error is None and store.durable_step == 4
    assert published(drive) == ["checkpoint-000003", "checkpoint-000004"]
    assert not [n for n in os.listdir(drive) if n.startswith(".")]
    fresh = CheckpointStore(tmp_path / "new-vm" / "checkpoints", drive)  # the VM and its disk are gone
    info = fresh.latest()
    assert info is not None and info.step == 4 and info.location == "durable" and info.path.parent == drive
    assert fresh.read(info, "optimizer.pt") == payload(4, 1, 40_000)
    fresh.close()


FAULTS = {
    "ENOTCONN": (errno.ENOTCONN, "Transport endpoint is not connected"),
    "ENOSPC": (errno.ENOSPC, "No space left on device"),
    "EIO": (errno.EIO, "Input/output error"),
    "zero-byte-copy": ("zero", "optimizer.pt is 0 bytes, manifest.json says 40.0 KB"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_durable_faults_never_raise_are_reported_once_and_retried(tmp_path, caplog, fault):
    code, text = FAULTS[fault]
    local, drive = tmp_path / "local", tmp_path / "drive"
    copy = FaultyCopy()
    store = CheckpointStore(local, backend=FolderBackend(drive, copy_file=copy), background=False)
    store.save(1, files_for(1), {})
    store.save(2, files_for(2), {})
    before = {n: (drive / n / "optimizer.pt").read_bytes() for n in published(drive)}
    caplog.set_level(logging.WARNING)
    copy.code = code
    for step in range(3, 6):
        store.save(step, files_for(step), {})  # must not raise
    assert not store.durable_ok and text in store.last_durable_error
    assert not store.flush()
    reports = warnings_about(caplog, "could not copy")
    assert len(reports) == 1 and text in reports[0] and "retried" in reports[0]
    assert published(drive) == ["checkpoint-000001", "checkpoint-000002"]  # older durable copies intact
    assert {n: (drive / n / "optimizer.pt").read_bytes() for n in published(drive)} == before
    assert not [n for n in os.listdir(drive) if n.startswith(".incoming")]
    assert published(local) == ["checkpoint-000004", "checkpoint-000005"]
    copy.code = None  # the place comes back: the newest local checkpoint is copied
    assert store.flush() and store.durable_ok
    assert published(drive) == ["checkpoint-000002", "checkpoint-000005"]
    assert isinstance(verify_checkpoint(drive / "checkpoint-000005"), CheckpointInfo)
    assert len(warnings_about(caplog, "works again")) == 1


def test_an_unmounted_drive_is_not_recreated_and_the_copy_resumes_when_it_returns(tmp_path, monkeypatch):
    mount = tmp_path / "drive" / "MyDrive"
    mount.mkdir(parents=True)
    monkeypatch.setenv("QLORA_LITE_DRIVE_ROOT", str(mount))
    durable = default_durable_root("run-1")
    assert durable == mount / "qlora_lite" / "run-1"
    store = CheckpointStore(tmp_path / "local", durable, retry_seconds=(0.05, 0.2))
    store.save(1, files_for(1), {})
    assert store.flush(timeout=30)
    mount.rename(tmp_path / "drive" / "unmounted")  # the FUSE mount goes away mid-run
    store.save(2, files_for(2), {})
    assert not store.flush(timeout=30) and "ENOTCONN" in store.last_durable_error
    assert not mount.exists()  # nothing written into the bare mount point on the local disk
    (tmp_path / "drive" / "unmounted").rename(mount)
    deadline = time.monotonic() + 20
    while not store.durable_ok and time.monotonic() < deadline:  # retried by the backoff, no new save
        time.sleep(0.02)
    assert store.durable_ok and published(durable) == ["checkpoint-000001", "checkpoint-000002"]
    store.close()


def test_background_copy_never_blocks_saves_and_newer_checkpoints_supersede_queued_ones(tmp_path):
    copy = FaultyCopy(delay=0.1)
    store = CheckpointStore(tmp_path / "local", backend=FolderBackend(tmp_path / "drive", copy_file=copy))
    started = time.monotonic()
    for step in range(1, 7):
        store.save(step, files_for(step), {})
    assert time.monotonic() - started < 0.3 * 6  # each upload takes >= 0.4 s; saves did not wait
    assert store.flush(timeout=30) and store.durable_step == 6
    assert copy.uploads < 6  # queued older checkpoints were superseded
    assert published(tmp_path / "drive")[-1] == "checkpoint-000006"
    assert threading.active_count() >= 1 and store.close()


def test_latest_copies_a_local_checkpoint_the_previous_process_did_not_get_to_copy(tmp_path):
    CheckpointStore(tmp_path / "local").save(7, files_for(7), {})
    store = CheckpointStore(tmp_path / "local", tmp_path / "drive", background=False)
    assert store.latest().step == 7 and published(tmp_path / "drive") == ["checkpoint-000007"]


def test_a_backend_without_in_place_folders_is_fetched_and_verified(tmp_path):
    class RemoteLike(FolderBackend):
        def folder(self, name):
            return None

    CheckpointStore(tmp_path / "old", backend=RemoteLike(tmp_path / "remote"), background=False).save(
        3, files_for(3), {}
    )
    store = CheckpointStore(tmp_path / "new", backend=RemoteLike(tmp_path / "remote"), background=False)
    info = store.latest()
    assert info.step == 3 and info.path == tmp_path / "new" / "checkpoint-000003"
    assert store.read(info, "adapter.safetensors") == payload(3, 0, 20_000)


def test_default_durable_root(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_LITE_DRIVE_ROOT", str(tmp_path / "not-mounted"))
    assert default_durable_root("run") is None
    monkeypatch.setenv("QLORA_LITE_DRIVE_ROOT", str(tmp_path))
    assert default_durable_root("run") == tmp_path / "qlora_lite" / "run"
    with pytest.raises(UserError, match="run name"):
        default_durable_root("a/b")


# ------------------------------------------------------------------------------------------ SIGKILL

CHILD = r"""
import hashlib, sys, types
from pathlib import Path
# Load the store without the package __init__ (which imports torch): ~0.1 s instead of seconds per start.
pkg = types.ModuleType("qlora_lite"); pkg.__path__ = [sys.argv[1]]; sys.modules["qlora_lite"] = pkg
from qlora_lite.checkpoint.store import CheckpointStore

def payload(step, index, size):
    block = hashlib.sha256(f"{step}-{index}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]

store = CheckpointStore(sys.argv[2], sys.argv[3], keep=2)
info = store.latest()
step = info.step + 1 if info else 1
print("ready", flush=True)
while True:
    files = {"adapter.safetensors": payload(step, 0, 1_500_000),
             "optimizer.pt": lambda f, s=step: f.write(payload(s, 1, 3_000_000))}
    store.save(step, files, {"step": step})
    step += 1
"""


def _check_content(info: CheckpointInfo) -> None:
    assert isinstance(verify_checkpoint(info.path, info.location), CheckpointInfo)
    assert (info.path / "optimizer.pt").read_bytes() == payload(info.step, 1, 3_000_000)
    assert (info.path / "adapter.safetensors").read_bytes() == payload(info.step, 0, 1_500_000)


def test_sigkill_at_random_moments_never_leaves_latest_corrupt(tmp_path):
    import qlora_lite

    package_dir = str(Path(qlora_lite.__file__).parent)
    local, drive = tmp_path / "local", tmp_path / "drive"
    rng = random.Random(1234)
    newest = mid_write = 0
    for kill in range(10):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, package_dir, str(local), str(drive)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        leftovers = [
            n for root in (local, drive) if root.is_dir() for n in os.listdir(root) if n.startswith(".")
        ]
        mid_write += bool(leftovers)  # killed while staging, uploading or rotating
        for root in (local, drive):  # every published folder verifies: no half-written checkpoint-* ever
            for name in published(root):
                assert isinstance(verify_checkpoint(root / name), CheckpointInfo), name
        fresh_machine = CheckpointStore(tmp_path / f"empty-{kill}", drive, background=False).latest()
        if fresh_machine is not None:
            _check_content(fresh_machine)
        info = CheckpointStore(local, drive, background=False).latest()
        if info is None:
            assert newest == 0 and fresh_machine is None
            continue
        _check_content(info)
        assert info.step >= newest and info.step >= (fresh_machine.step if fresh_machine else 0)
        newest = info.step
    assert newest >= 5  # the loop made progress between kills
    assert mid_write >= 1  # and some kills landed inside a save or a copy


def test_a_run_folder_that_is_not_a_checkpoint_is_copied_once_and_retried_after_a_fault(tmp_path, caplog):
    """A LoftQ run's base: uploaded under its own name, never listed or rotated as a checkpoint; a copy that
    fails is retried after the next checkpoint copy (checkpoint/run_assets.py)."""
    from qlora_lite.checkpoint.manifest import build_manifest, manifest_bytes, sha256_file

    asset = tmp_path / "loftq_base"
    asset.mkdir()
    (asset / "model.safetensors").write_bytes(payload(0, 0, 5000))
    size, sha = sha256_file(asset / "model.safetensors")
    manifest = build_manifest(0, {"model.safetensors": {"size": size, "sha256": sha}}, {})
    (asset / MANIFEST).write_bytes(manifest_bytes(manifest))
    failing = {"on": True}

    def copy(src: Path, dst: Path) -> None:
        if failing["on"] and src.name == "model.safetensors":
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", str(dst))
        copy_file_fsync(src, dst)

    drive = tmp_path / "drive"
    store = CheckpointStore(
        tmp_path / "local", backend=FolderBackend(drive, copy_file=copy), background=False
    )
    caplog.set_level(logging.WARNING)
    assert not store.assets.copy(asset, "loftq-base-abc")  # the first try fails: a warning, no exception
    assert warnings_about(caplog, "retried after the next checkpoint copy")
    assert not (drive / "loftq-base-abc").exists()
    failing["on"] = False
    for step in (1, 2, 3):  # the place works again: the first checkpoint copy takes the folder along
        store.save(step, files_for(step), {})
    assert (drive / "loftq-base-abc" / "model.safetensors").read_bytes() == (
        asset / "model.safetensors"
    ).read_bytes()
    assert published(drive) == ["checkpoint-000002", "checkpoint-000003"]  # rotation left it alone
    assert store.latest().step == 3
