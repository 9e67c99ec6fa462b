"""Atomic, verified checkpoints: a local store plus a durable copy (Drive now, the Hub later).

    store = CheckpointStore(out / "checkpoints", durable_root=default_durable_root("my-run"))
    store.save(step, {"adapter.safetensors": data, "optimizer.pt": lambda f: torch.save(sd, f)}, metadata)
    info = store.latest()          # newest checkpoint that verifies, local or durable
    state = store.read(info, "optimizer.pt")

save() stages the files in `<local_root>/.staging-...`, fsyncs each, writes manifest.json last (sizes and
sha256 of every file), and publishes by renaming to `checkpoint-<step:06d>`. A background worker then
copies it to the durable place, verifies the copy by re-reading it, and only then rotates out old
checkpoints. Durable faults (unmounted Drive, full quota) are reported once and retried; they never stop
training. See PITFALLS.md, "Checkpoints and resume".
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from qlora_lite.checkpoint.copier import DurableCopier, describe_error
from qlora_lite.checkpoint.durable import (
    RETIRED,
    DurableBackend,
    FolderBackend,
    archive_label,
    default_durable_root,
    publish_dir,
    remove_tree,
)
from qlora_lite.checkpoint.lock import pid_alive
from qlora_lite.checkpoint.manifest import (
    MANIFEST,
    CheckpointInfo,
    CorruptCheckpointError,
    SkippedCheckpoint,
    build_manifest,
    check_file_name,
    checkpoint_name,
    fsync_dir,
    manifest_bytes,
    read_verified,
    sha256_file,
    step_of,
    verify_checkpoint,
)
from qlora_lite.checkpoint.rotation import Rotation
from qlora_lite.checkpoint.run_assets import RunAssets
from qlora_lite.errors import UserError
from qlora_lite.run_files import STAGING  # noqa: F401 (re-exported)

__all__ = [
    "CheckpointInfo",
    "CheckpointStore",
    "CorruptCheckpointError",
    "DurableBackend",
    "FolderBackend",
    "SkippedCheckpoint",
    "default_durable_root",
]

log = logging.getLogger(__name__)


FileSource = bytes | Callable[[BinaryIO], None] | os.PathLike
_FULL = {errno.ENOSPC, errno.EDQUOT}
_DENIED = {errno.EACCES, errno.EROFS, errno.EPERM}


def _is_stale_staging(path: Path) -> bool:
    """A staging folder whose process is gone (a crash or a SIGKILL during a save)."""
    try:
        pid = int(path.name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return True
    return pid != os.getpid() and not pid_alive(pid)


def _write_source(handle: BinaryIO, source: FileSource) -> None:
    if isinstance(source, (bytes, bytearray, memoryview)):
        handle.write(source)
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fin:
            shutil.copyfileobj(fin, handle, 1 << 20)
    elif callable(source):
        source(handle)
    else:
        raise TypeError(
            f"a checkpoint file is bytes, a path or a writer callable, not {type(source).__name__}"
        )


class DurableListingError(UserError):
    """The durable place could not be listed at the start of a run."""


class CheckpointStore:
    """Checkpoints of one run: `local_root` (fast, dies with the machine) and an optional durable copy.

    `durable_root` is a mounted folder (Drive); pass `backend=` for another kind of durable place.
    `keep` newest verified checkpoints are kept in each place. `retry_seconds` = (first, max) backoff
    between retries of a failed durable copy; a new save retries at once. `run_id` (settable until the first
    save) is written into every manifest: rotation only ever removes checkpoints of this run.
    """

    def __init__(
        self,
        local_root: str | Path,
        durable_root: str | Path | None = None,
        keep: int = 2,
        background: bool = True,
        *,
        backend: DurableBackend | None = None,
        retry_seconds: tuple[float, float] = (5.0, 300.0),
        run_id: str | None = None,
    ):
        if keep < 1:
            raise UserError(f"keep={keep}: at least one checkpoint must be kept (use keep >= 1)")
        if durable_root is not None and backend is not None:
            raise ValueError("give durable_root or backend, not both")
        self.local_root = Path(local_root).expanduser()
        self.backend = backend or (FolderBackend(durable_root) if durable_root is not None else None)
        self.keep = keep
        self.background = background
        self.retry_seconds = retry_seconds
        self._rotation = Rotation(keep, run_id, backend=self.backend)
        self._verified = self._rotation.verified
        self._warned: set[str] = set()
        self._copier = (
            DurableCopier(self.backend, background, retry_seconds, self._after_copy) if self.backend else None
        )
        self.assets = RunAssets(self.backend)  # the run's folders that are not checkpoints (a LoftQ base)

    @property
    def run_id(self) -> str | None:
        """The id written into this run's manifests; rotation only removes checkpoints that carry it."""
        return self._rotation.run_id

    @run_id.setter
    def run_id(self, value: str | None) -> None:
        self._rotation.run_id = value

    @property
    def durable_ok(self) -> bool:
        """False while copies to the durable place fail (see `last_durable_error`)."""
        return self.backend is None or self.last_durable_error is None

    # ----------------------------------------------------------------------------------------- saving

    def save(self, step: int, files: dict[str, FileSource], metadata: dict) -> CheckpointInfo:
        """Write and publish checkpoint `step` locally (atomic), then queue its durable copy.

        Each file is bytes, a path to copy, or a callable that writes into an open binary file. Raises
        UserError when the local disk is full or read-only; the earlier checkpoints stay intact.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, not {step}")
        for file_name in files:
            check_file_name(file_name)
        manifest_bytes(build_manifest(step, {}, metadata, self.run_id))  # JSON-able before any write
        name = checkpoint_name(step)
        started = time.monotonic()
        staging = self.local_root / f"{STAGING}{name}-{os.getpid()}-{secrets.token_hex(4)}"
        current = "the staging folder"
        try:
            self.local_root.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            entries: dict[str, dict] = {}
            folders = {staging}
            for file_name, source in files.items():
                current = file_name
                target = staging / file_name
                target.parent.mkdir(parents=True, exist_ok=True)
                folders.add(target.parent)
                with open(target, "wb") as handle:
                    _write_source(handle, source)
                    handle.flush()
                    os.fsync(handle.fileno())
                size, sha = sha256_file(target)
                entries[file_name] = {"size": size, "sha256": sha}
            current = MANIFEST
            manifest = build_manifest(step, entries, metadata, self.run_id)
            with open(staging / MANIFEST, "wb") as handle:
                handle.write(manifest_bytes(manifest))
                handle.flush()
                os.fsync(handle.fileno())
            for folder in folders:
                fsync_dir(folder)
            current = f"the rename to {name}"
            publish_dir(staging, self.local_root / name)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise self._local_error(exc, name, current) from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        info = CheckpointInfo(self.local_root / name, step, manifest, manifest["created_unix"], "local")
        self._verified[("local", name)] = info
        total = sum(entry["size"] for entry in entries.values())
        log.info("saved %s (%.1f MB) in %.2f s", info.path, total / 1e6, time.monotonic() - started)
        if self._copier is not None:
            self._copier.submit(info)  # queued (and so protected from rotation) before rotating
        self._rotate_local(also_keep=name)
        return info

    def _local_error(self, exc: OSError, name: str, current: str) -> BaseException:
        if exc.errno in _FULL:
            return UserError(
                f"the checkpoint folder {self.local_root} is full ({exc.strerror}) while writing {current} of "
                f"{name}: free space on that disk or use an output folder on a bigger disk; the earlier "
                "checkpoints are intact"
            )
        if exc.errno in _DENIED:
            return UserError(
                f"cannot write checkpoint {name} in {self.local_root} ({exc.strerror}): make the folder "
                "writable or use another output folder"
            )
        return exc

    def _local_names(self) -> list[str]:
        if not self.local_root.is_dir():
            return []
        return [p.name for p in self.local_root.iterdir() if step_of(p.name) is not None and p.is_dir()]

    def _rotate_local(self, also_keep: str) -> None:
        protect = (self._copier.protected() if self._copier else set()) | {also_keep}
        try:
            self._rotation.rotate(
                self._local_names(),
                "local",
                lambda name: self.local_root / name,
                lambda name: remove_tree(self.local_root / name),
                protect,
            )
            for path in self.local_root.iterdir():
                if path.name.startswith(RETIRED) or (
                    path.name.startswith(STAGING) and _is_stale_staging(path)
                ):
                    shutil.rmtree(path, ignore_errors=True)
        except OSError as exc:
            self._warn_once(f"rotate:{exc}", f"could not remove old checkpoints in {self.local_root}: {exc}")

    # ------------------------------------------------------------------------------- the durable copy

    @property
    def last_durable_error(self) -> str | None:
        """Why the latest durable copy failed (None while copies work or without a durable place)."""
        return self._copier.last_error if self._copier else None

    @property
    def durable_step(self) -> int | None:
        """The newest step this process copied to the durable place and verified there."""
        return self._copier.durable_step if self._copier else None

    def _after_copy(self, job: CheckpointInfo) -> None:
        assert self.backend is not None
        self.assets.retry()  # the durable place works again: a folder that failed earlier goes now
        path = self.backend.folder(job.name) or job.path
        self._verified[("durable", job.name)] = CheckpointInfo(
            path, job.step, job.manifest, job.written_unix, "durable"
        )
        try:
            self._rotation.rotate(
                self.backend.list(), "durable", self.backend.folder, self.backend.delete, {job.name}
            )
        except Exception as exc:  # noqa: BLE001 - never into training
            self._warn_once(
                f"durable-rotate:{type(exc).__name__}",
                f"could not remove old checkpoints in {self.backend.description}: {describe_error(exc)}",
            )

    def archive(self) -> list[str]:
        """Move every checkpoint aside, locally and in the durable place (kept, no longer resumed from).

        What a fresh start (resume="never", overwrite) does first, so the older run's checkpoints neither
        shadow nor rotate away the new run's. Returns where they went. Raises UserError when the durable place
        cannot be listed or changed (nothing is started on top of checkpoints that could not be moved).
        """
        moved = []
        label = archive_label()
        names = self._local_names()
        if names:
            target = self.local_root / label
            target.mkdir()
            for name in names:
                os.rename(self.local_root / name, target / name)
            moved.append(str(target))
        if self.backend is not None:
            try:
                names = self.backend.list()
                if names:
                    moved.append(self.backend.archive(names, label))
            except UserError:
                raise
            except Exception as exc:
                raise UserError(
                    f"cannot move the older checkpoints in {self.backend.description} aside "
                    f"({describe_error(exc)}): fix the durable place (mount Drive, check the token) and run again"
                ) from exc
        self._verified.clear()
        self._rotation.unverified.clear()
        for where in moved:
            log.warning("moved the older run's checkpoints aside (kept) to %s", where)
        return moved

    def flush(self, timeout: float | None = None) -> bool:
        """Try the pending durable copy now and wait for it; True when every checkpoint is copied.

        Returns False after one failed try (the copy stays queued and is retried) or at `timeout`.
        """
        return self._copier.flush(timeout) if self._copier else True

    def close(self, timeout: float | None = None) -> bool:
        """Flush the durable copy and stop its worker; returns flush()'s answer."""
        return self._copier.close(timeout) if self._copier else True

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- reading

    def _durable_names(self, strict: bool = False) -> list[str]:
        if self.backend is None:
            return []
        try:
            return self.backend.list()
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            if strict:
                raise DurableListingError(
                    f"cannot list the checkpoints in {self.backend.description} ({describe_error(exc)}), so "
                    "this run cannot tell whether it should continue from there: fix the durable place (mount "
                    "Drive, renew the token, wait for the Hub) and run again, or pass resume='local' (--resume "
                    "local) to continue from this machine's checkpoints on purpose"
                ) from exc
            self._warn_once(
                f"durable-list:{type(exc).__name__}",
                f"cannot list the durable place {self.backend.description} ({describe_error(exc)}): "
                "looking at local checkpoints only",
            )
            return []

    def _check_durable(self, name: str) -> CheckpointInfo | SkippedCheckpoint:
        assert self.backend is not None
        folder = self.backend.folder(name)
        if folder is not None:
            return verify_checkpoint(folder, "durable")
        tmp = self.local_root / f"{STAGING}{name}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.local_root.mkdir(parents=True, exist_ok=True)
            self.backend.fetch(name, tmp)
            checked = verify_checkpoint(tmp, "durable", name=name)
            if isinstance(checked, CheckpointInfo):
                publish_dir(tmp, self.local_root / name)
                return verify_checkpoint(self.local_root / name, "durable")
            return checked
        except Exception as exc:  # noqa: BLE001
            return SkippedCheckpoint(
                Path(self.backend.description) / name,
                step_of(name),
                f"fetch failed: {describe_error(exc)}",
                "durable",
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _leftovers(self) -> list[SkippedCheckpoint]:
        found = []
        if self.local_root.is_dir():
            for path in sorted(self.local_root.iterdir()):
                if path.name.startswith(STAGING) and _is_stale_staging(path):
                    reason = "an unfinished save (the process stopped while writing it); not a checkpoint"
                    found.append(SkippedCheckpoint(path, None, reason, "local"))
        if self.backend is not None:
            try:
                found += self.backend.leftovers()
            except OSError:
                pass
        return found

    def latest(self, *, durable: bool = True) -> CheckpointInfo | None:
        """The newest checkpoint that verifies against its manifest, local or durable (None if none).

        Each folder skipped on the way (corrupt, incomplete, unknown format) is warned about once. A durable
        place that cannot be listed raises `DurableListingError` (a fresh start there would be silent);
        `durable=False` looks at the local checkpoints only.
        """
        for skipped in self._leftovers():
            self._warn_once(str(skipped.path), f"ignoring {skipped.message()}")
        local = set(self._local_names())
        durable_names = set(self._durable_names(strict=True)) if durable else set()
        for name in sorted(local | durable_names, key=step_of, reverse=True):
            if name in local:
                checked = verify_checkpoint(self.local_root / name, "local")
                if isinstance(checked, CheckpointInfo):
                    if self._copier is not None and durable and name not in durable_names:
                        self._copier.submit(checked)  # the previous process died before copying it
                    return checked
                self._warn_once(str(checked.path), f"skipping {checked.message()}")
            if name in durable_names:
                checked = self._check_durable(name)
                if isinstance(checked, CheckpointInfo):
                    return checked
                self._warn_once(str(checked.path), f"skipping {checked.message()}")
        return None

    def list(self) -> list[CheckpointInfo | SkippedCheckpoint]:
        """Every checkpoint in both places, each verified or with the reason it is not (newest first)."""
        found: list[CheckpointInfo | SkippedCheckpoint] = []
        for name in self._local_names():
            found.append(verify_checkpoint(self.local_root / name, "local"))
        for name in self._durable_names():
            folder = self.backend.folder(name) if self.backend else None
            if folder is not None:
                found.append(verify_checkpoint(folder, "durable"))
            else:
                reason = "remote; verified when fetched on resume"
                found.append(
                    SkippedCheckpoint(Path(self.backend.description) / name, step_of(name), reason, "durable")
                )
        found.sort(key=lambda c: (c.step if c.step is not None else -1, c.location == "local"), reverse=True)
        return found + self._leftovers()

    def read(self, info: CheckpointInfo, name: str) -> bytes:
        """The bytes of file `name` of checkpoint `info`, re-checked against its manifest sha256."""
        return read_verified(info, name)

    def file_path(self, info: CheckpointInfo, name: str) -> Path:
        """The path of file `name` of `info` after re-checking its hash (for loaders that want a path)."""
        read_verified(info, name)
        return info.path / name

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)
