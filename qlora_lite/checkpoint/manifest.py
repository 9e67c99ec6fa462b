"""The checkpoint manifest: what a published checkpoint holds, and how a folder is checked against it.

A checkpoint is a folder `checkpoint-<step:06d>` holding the caller's files and `manifest.json`, which is
written last and lists every file with its size and sha256. A folder is trusted only when its manifest
parses, is of a format this version reads, and every listed file exists with the listed size and hash.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlora_lite.errors import UserError
from qlora_lite.run_files import MANIFEST  # noqa: F401 (re-exported)

FORMAT = "qlora_lite.checkpoint"
FORMAT_VERSION = 1

_NAME = re.compile(r"^checkpoint-(\d{6,})$")
_CHUNK = 1 << 20


def library_version() -> str:
    try:
        return importlib.metadata.version("qlora-lite")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint for `step`: checkpoint-000120."""
    return f"checkpoint-{step:06d}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name, None for anything else (staging folders, stray files)."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class CheckpointInfo:
    """A published checkpoint that verified against its manifest."""

    path: Path
    step: int
    manifest: dict = field(repr=False)
    written_unix: float
    location: str = "local"  # "local" or "durable"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metadata(self) -> dict:
        return self.manifest.get("metadata", {})

    @property
    def run_id(self) -> str | None:
        """The run that wrote it (None for checkpoints written before runs had ids)."""
        return self.manifest.get("run_id")

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest["files"]


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A folder that looks like a checkpoint but cannot be trusted, and why."""

    path: Path
    step: int | None
    reason: str
    location: str = "local"

    @property
    def name(self) -> str:
        return self.path.name

    def message(self) -> str:
        return f"{self.name} ({self.location}, {self.path.parent}): {self.reason}"


class CorruptCheckpointError(UserError):
    """A checkpoint file no longer matches the manifest it verified against."""


def format_size(size: int) -> str:
    if size < 1000:
        return "1 byte" if size == 1 else f"{size} bytes"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    raise AssertionError  # unreachable


def _sizes(actual: int, expected: int) -> tuple[str, str]:
    a, e = format_size(actual), format_size(expected)
    return (f"{actual} bytes", f"{expected} bytes") if a == e else (a, e)


def sha256_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable; a no-op where the file system cannot (FUSE, Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def check_file_name(name: str) -> None:
    """A file name in a checkpoint: relative, no '..', not hidden, not the manifest."""
    parts = Path(name).parts
    if (
        not name
        or Path(name).is_absolute()
        or name == MANIFEST
        or any(part in ("..", ".") or part.startswith(".") for part in parts)
        or "\\" in name
    ):
        raise ValueError(f"checkpoint file name {name!r} must be a plain relative path other than {MANIFEST}")


def build_manifest(step: int, files: dict[str, dict], metadata: dict, run_id: str | None = None) -> dict:
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qlora_lite_version": library_version(),
        "step": step,
        "created_unix": time.time(),
        "files": files,
        "metadata": metadata,
    }
    if run_id is not None:  # which run wrote it: places shared by several runs tell them apart by it
        manifest["run_id"] = run_id
    return manifest


def manifest_bytes(manifest: dict) -> bytes:
    """Serialized manifest; raises TypeError for metadata that JSON cannot hold (before anything is written)."""
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _read_manifest(path: Path) -> tuple[dict | None, str | None]:
    manifest_path = path / MANIFEST
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        return None, f"no {MANIFEST} (the save or the copy did not finish)"
    except OSError as exc:
        return None, f"{MANIFEST} cannot be read ({exc.strerror or exc})"
    if not raw:
        return None, f"{MANIFEST} is empty (a copy that has not arrived yet?)"
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{MANIFEST} is not valid JSON ({exc}; truncated copy?)"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None, f"{MANIFEST} is not a qlora_lite checkpoint manifest"
    version = manifest.get("format_version")
    if not isinstance(version, int):
        return None, f"{MANIFEST} has no format_version"
    if version > FORMAT_VERSION:
        writer = manifest.get("qlora_lite_version", "an unknown version")
        return None, (
            f"written by qlora_lite {writer} in checkpoint format {version}; this qlora_lite "
            f"({library_version()}) reads format {FORMAT_VERSION} at most: upgrade qlora_lite to resume from it"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        return None, f"{MANIFEST} lacks its step or file list"
    return manifest, None


def verify_checkpoint(
    path: Path, location: str = "local", name: str | None = None
) -> CheckpointInfo | SkippedCheckpoint:
    """Check a checkpoint folder against its manifest (re-reading every file's sha256).

    `name` is the published name the folder stands for (defaults to the folder's own name; a durable copy
    is verified under its temporary name before it is published).
    """
    name = name or path.name
    step = step_of(name)
    manifest, reason = _read_manifest(path)
    if manifest is None:
        return SkippedCheckpoint(path, step, reason or "unreadable", location)
    if step is not None and manifest["step"] != step:
        return SkippedCheckpoint(path, step, f"{MANIFEST} says step {manifest['step']}, not {step}", location)
    for file_name, entry in sorted(manifest["files"].items()):
        try:
            check_file_name(file_name)
            size, sha = int(entry["size"]), str(entry["sha256"])
        except (ValueError, TypeError, KeyError):
            return SkippedCheckpoint(path, step, f"{MANIFEST} has a bad entry for {file_name!r}", location)
        file_path = path / file_name
        try:
            actual = file_path.stat().st_size
        except FileNotFoundError:
            return SkippedCheckpoint(path, step, f"{file_name} is missing ({MANIFEST} lists it)", location)
        except OSError as exc:
            return SkippedCheckpoint(
                path, step, f"{file_name} cannot be read ({exc.strerror or exc})", location
            )
        if actual != size:
            a, e = _sizes(actual, size)
            why = "truncated copy?" if actual < size else "overwritten after the save?"
            return SkippedCheckpoint(path, step, f"{file_name} is {a}, {MANIFEST} says {e} ({why})", location)
        try:
            _, actual_sha = sha256_file(file_path)
        except OSError as exc:
            return SkippedCheckpoint(
                path, step, f"{file_name} cannot be read ({exc.strerror or exc})", location
            )
        if actual_sha != sha:
            return SkippedCheckpoint(
                path,
                step,
                f"{file_name} does not match its sha256 in {MANIFEST} (corrupted or changed)",
                location,
            )
    return CheckpointInfo(
        path, manifest["step"], manifest, float(manifest.get("created_unix", 0.0)), location
    )


def read_verified(info: CheckpointInfo, name: str) -> bytes:
    """The bytes of one file of a checkpoint, after checking them against the manifest."""
    entry = info.files.get(name)
    if entry is None:
        raise KeyError(f"{info.name} has no file {name!r} (it holds {', '.join(sorted(info.files))})")
    try:
        data = (info.path / name).read_bytes()
    except OSError as exc:
        raise CorruptCheckpointError(
            f"{info.path}: cannot read {name} ({exc.strerror or exc}); remove this checkpoint folder to resume "
            "from an older one"
        ) from exc
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CorruptCheckpointError(
            f"{info.path}: {name} changed since the checkpoint was verified (size or sha256 differ from "
            f"{MANIFEST}); remove this checkpoint folder to resume from an older one"
        )
    return data
