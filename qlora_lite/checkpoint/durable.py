"""Durable places for checkpoints: somewhere that survives the machine (a mounted Drive, later the Hub).

The checkpoint store talks to a `DurableBackend`; `FolderBackend` serves any mounted folder. Google Drive
on Colab is a FUSE cache that uploads late and out of order, can show a file as 0 bytes, and can drop
the mount ("Transport endpoint is not connected"), so an upload is copied under a temporary name,
fsynced, verified by re-reading every file from the copy, and only then renamed into place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from qlora_lite.checkpoint.manifest import MANIFEST, SkippedCheckpoint, fsync_dir, step_of, verify_checkpoint
from qlora_lite.errors import UserError

DRIVE_MOUNT = "/content/drive"
DRIVE_ROOT = "/content/drive/MyDrive"
DRIVE_ROOT_ENV = "QLORA_LITE_DRIVE_ROOT"  # a stand-in folder for Drive (tests, notebook smoke mode)
DRIVE_MOUNT_ENV = "QLORA_LITE_DRIVE_MOUNT"  # where Drive is mounted, when not /content/drive
MOUNT_DRIVE_HINT = "from google.colab import drive; drive.mount('/content/drive')"
INCOMING = ".incoming-"
RETIRED = ".retired-"
ARCHIVED = "archived-"  # older runs' checkpoints moved aside (kept) by resume="never" or overwrite

CopyFile = Callable[[Path, Path], None]


def is_mount_point(path: str | Path) -> bool:
    """True when `path` is a mount point (os.path.ismount, or listed in /proc/mounts for FUSE mounts)."""
    path = Path(path)
    if os.path.ismount(path):
        return True
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    # /proc/mounts writes a space or tab in a mount point as an octal escape (\040).
    points = {
        re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[1])
        for line in mounts
        if len(line.split()) > 1
    }
    return str(path.resolve()) in points


def drive_root() -> Path:
    """The Google Drive folder: /content/drive/MyDrive, or $QLORA_LITE_DRIVE_ROOT."""
    return Path(os.environ.get(DRIVE_ROOT_ENV) or DRIVE_ROOT)


def drive_mount() -> Path:
    """Where Google Drive is mounted; a stand-in $QLORA_LITE_DRIVE_ROOT is its own mount."""
    if os.environ.get(DRIVE_MOUNT_ENV):
        return Path(os.environ[DRIVE_MOUNT_ENV])
    return drive_root() if os.environ.get(DRIVE_ROOT_ENV) else Path(DRIVE_MOUNT)


def drive_mounted() -> bool:
    """True when Google Drive is really mounted (a mount point), not when a bare folder sits there.

    A stand-in folder named by $QLORA_LITE_DRIVE_ROOT (without $QLORA_LITE_DRIVE_MOUNT) counts when it exists.
    """
    if os.environ.get(DRIVE_ROOT_ENV) and not os.environ.get(DRIVE_MOUNT_ENV):
        return drive_root().is_dir()
    return is_mount_point(drive_mount()) and drive_root().is_dir()


def on_drive(path: str | Path) -> bool:
    """True for a path inside the Google Drive mount (/content/drive/...)."""
    mount = drive_mount().expanduser().absolute()
    return Path(path).expanduser().absolute().is_relative_to(mount)


def check_drive_path(path: str | Path) -> None:
    """Refuse a Drive path while Drive is not mounted: writing there would fill the bare mount point on the
    local disk, which vanishes with the VM (and every copy would look verified)."""
    if on_drive(path) and not drive_mounted():
        raise UserError(
            f"{path} is on Google Drive, but Drive is not mounted at {drive_mount()}: run "
            f"`{MOUNT_DRIVE_HINT}` first (or choose a checkpoint folder that is not on Drive)"
        )


def default_durable_root(run_name: str) -> Path | None:
    """`<Drive>/qlora_lite/<run_name>` when Google Drive is mounted (Colab), else None.

    The Drive root is /content/drive/MyDrive, or $QLORA_LITE_DRIVE_ROOT when set.
    """
    if not run_name or run_name in (".", "..") or "/" in run_name or "\\" in run_name:
        raise UserError(f"run name {run_name!r} cannot name a folder on Drive: use letters, digits, '-', '_'")
    return drive_root() / "qlora_lite" / run_name if drive_mounted() else None


def archive_label() -> str:
    """`archived-20260101-120000-1a2b`: a new, sortable folder name for checkpoints moved aside."""
    return f"{ARCHIVED}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def copy_file_fsync(src: Path, dst: Path) -> None:
    """Copy one file and fsync the copy (the default `copy_file` of FolderBackend)."""
    # No mkdir here: if the mount vanished mid-copy, creating parents would rebuild the bare mount point on
    # the local disk (which dies with the VM) and "succeed". upload() makes the folders while mounted.
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def remove_tree(path: Path) -> None:
    """Delete a folder so that no half-deleted checkpoint is left: rename it to a hidden name first."""
    if not path.exists():
        return
    hidden = path.with_name(f"{RETIRED}{path.name}-{secrets.token_hex(4)}")
    os.rename(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, replacing an existing `final` (moved aside first, deleted after)."""
    old = None
    if final.exists():
        old = final.with_name(f"{RETIRED}{final.name}-{secrets.token_hex(4)}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest_file(path: Path) -> dict | None:
    """A parsed manifest.json, or None when it is missing or not JSON (an unfinished copy)."""
    try:
        manifest = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


class DurableBackend(ABC):
    """A place where published checkpoints survive the machine. Every method may raise OSError."""

    description: str = "durable place"

    @abstractmethod
    def upload(self, local_dir: Path, name: str) -> None:
        """Copy the verified local checkpoint folder, verify the copy against its manifest, publish as `name`."""

    @abstractmethod
    def list(self) -> list[str]:
        """Names of the published checkpoints."""

    @abstractmethod
    def fetch(self, name: str, dest: Path) -> None:
        """Copy checkpoint `name` into the new folder `dest`."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove checkpoint `name`."""

    def folder(self, name: str) -> Path | None:
        """A folder holding checkpoint `name` that can be read in place, or None (fetch it first)."""
        return None

    def archive(self, names: list[str], label: str) -> str:
        """Move checkpoints `names` aside under `label` (kept, no longer listed); returns where they went."""
        raise OSError(errno.ENOTSUP, f"{self.description} cannot move checkpoints aside")

    def manifest(self, name: str) -> dict | None:
        """The parsed manifest of checkpoint `name` (None when it has none), without reading its files."""
        folder = self.folder(name)
        if folder is None:
            raise OSError(errno.ENOTSUP, f"{self.description} cannot read {name}'s manifest in place")
        return read_manifest_file(folder / MANIFEST)

    def leftovers(self) -> list[SkippedCheckpoint]:
        """Unfinished uploads, for reports."""
        return []


def _make_folders_below(top: Path, relative: Path) -> None:
    """Create `top/relative` one level at a time, never `top` or its parents: with parents=True a mount that
    vanished mid-copy would be rebuilt on the local disk, and every later copy would land there."""
    folder = top
    for part in relative.parts:
        folder = folder / part
        folder.mkdir(exist_ok=True)


class FolderBackend(DurableBackend):
    """Any mounted folder (Google Drive on Colab, a network share, a second disk).

    `copy_file(src, dst)` copies and fsyncs one file; tests inject faults through it.
    """

    def __init__(self, root: str | Path, copy_file: CopyFile = copy_file_fsync):
        self.root = Path(root).expanduser()
        self.description = str(self.root)
        self.copy_file = copy_file
        check_drive_path(self.root)
        # The nearest folder that exists now (on Drive: the mount itself). If it vanishes (Drive unmounted)
        # we must not recreate the path: that would write into the bare mount point on the local disk.
        anchor = self.root
        while not anchor.exists() and anchor.parent != anchor:
            anchor = anchor.parent
        mount = drive_mount().expanduser().absolute()
        if on_drive(self.root) and not anchor.absolute().is_relative_to(mount):
            anchor = mount
        self.anchor = anchor
        self._current: Path | None = None

    def _check_mounted(self) -> None:
        if not self.anchor.is_dir():
            raise OSError(errno.ENOTCONN, f"{self.anchor} is gone (unmounted?)", str(self.anchor))

    def _make_root(self) -> None:
        """Create the folders below the anchor one level at a time, never the anchor itself: if the mount
        vanishes between the check and here, mkdir fails instead of rebuilding it on the local disk."""
        missing = []
        folder = self.root
        while folder != self.anchor and not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except FileExistsError:
                pass

    def upload(self, local_dir: Path, name: str) -> None:
        self._check_mounted()
        self._make_root()
        self._remove_stale_incoming()
        tmp = self.root / f"{INCOMING}{name}-{os.getpid()}-{secrets.token_hex(4)}"
        self._current = tmp
        try:
            tmp.mkdir()
            manifest = json.loads((local_dir / MANIFEST).read_bytes())
            for file_name in manifest["files"]:
                _make_folders_below(tmp, Path(file_name).parent)
            for file_name in sorted(manifest["files"]):
                self.copy_file(local_dir / file_name, tmp / file_name)
            # The manifest goes last, so a copy cut short never has one.
            self.copy_file(local_dir / MANIFEST, tmp / MANIFEST)
            fsync_dir(tmp)
            checked = verify_checkpoint(tmp, "durable", name=name)
            if isinstance(checked, SkippedCheckpoint):
                raise OSError(errno.EIO, f"the copy does not match its manifest: {checked.reason}")
            there = read_manifest_file(self.root / name / MANIFEST) or {}
            if there.get("run_id") not in (None, manifest.get("run_id")):
                # Two runs writing into one place (same output name on one Drive): never replace the other's.
                raise OSError(errno.EEXIST, f"{name} there belongs to another run (run id {there['run_id']})")
            publish_dir(tmp, self.root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self._current = None

    def _remove_stale_incoming(self) -> None:
        for path in self.root.iterdir():
            if path.name.startswith((INCOMING, RETIRED)) and path != self._current:
                shutil.rmtree(path, ignore_errors=True)

    def list(self) -> list[str]:
        self._check_mounted()
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if step_of(p.name) is not None and p.is_dir())

    def fetch(self, name: str, dest: Path) -> None:
        shutil.copytree(self.root / name, dest)

    def manifest(self, name: str) -> dict | None:
        return read_manifest_file(self.root / name / MANIFEST)

    def archive(self, names: list[str], label: str) -> str:
        self._check_mounted()
        target = self.root / label
        target.mkdir()
        for name in names:
            os.rename(self.root / name, target / name)
        fsync_dir(self.root)
        return str(target)

    def delete(self, name: str) -> None:
        remove_tree(self.root / name)

    def folder(self, name: str) -> Path | None:
        return self.root / name

    def leftovers(self) -> list[SkippedCheckpoint]:
        if not self.root.is_dir():
            return []
        return [
            SkippedCheckpoint(
                p, None, "an unfinished copy (stopped while uploading); not a checkpoint", "durable"
            )
            for p in sorted(self.root.iterdir())
            if p.name.startswith(INCOMING) and p != self._current
        ]
