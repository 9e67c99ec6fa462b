"""Rotation: which old checkpoints may go, so that a place keeps the `keep` newest verified ones of this run.

A place can hold more than this run's checkpoints: an older run's (same output name on one Drive, a resume
forced onto other settings), or a Drive copy still arriving. Rotation counts and removes only checkpoints
that verify and carry this run's id; in the durable place it never removes a folder that does not verify.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from qlora_lite.checkpoint.durable import DurableBackend
from qlora_lite.checkpoint.manifest import CheckpointInfo, step_of, verify_checkpoint

log = logging.getLogger(__name__)


class Rotation:
    """The verification cache of one store and its rotation rule."""

    def __init__(self, keep: int, run_id: str | None, backend: DurableBackend | None = None) -> None:
        self.keep = keep
        self.run_id = run_id
        self.backend = backend
        self.verified: dict[tuple[str, str], CheckpointInfo] = {}
        self.unverified: set[str] = set()  # durable folders that did not verify (a copy still arriving?)

    def owns(self, info: CheckpointInfo) -> bool:
        """A checkpoint of this run (or written before runs had ids, or any when no run id is set)."""
        return self.run_id is None or info.run_id is None or info.run_id == self.run_id

    def checked(
        self, location: str, name: str, folder: Callable[[str], Path | None]
    ) -> CheckpointInfo | None:
        info = self.verified.get((location, name))
        if info is not None or (location == "durable" and name in self.unverified):
            return info
        path = folder(name)
        if path is not None:
            checked = verify_checkpoint(path, location)
        else:  # a remote place: its manifest says which run wrote it; its files are verified when fetched
            assert self.backend is not None
            manifest = self.backend.manifest(name)
            ok = isinstance(manifest, dict) and manifest.get("step") == step_of(name)
            where = Path(self.backend.description) / name
            checked = CheckpointInfo(where, manifest["step"], manifest, 0.0, location) if ok else None
        if isinstance(checked, CheckpointInfo):
            self.verified[(location, name)] = checked
            return checked
        if location == "durable":
            self.unverified.add(name)
        return None

    def rotate(
        self,
        names: Iterable[str],
        location: str,
        folder: Callable[[str], Path | None],
        delete: Callable[[str], None],
        protect: set[str],
    ) -> None:
        """Keep the `keep` newest verified checkpoints of this run (and anything newer); delete older ones.

        Other runs' checkpoints are neither counted nor deleted; in the durable place neither is a folder that
        does not verify. `protect`: names never deleted (the one just saved, the one being copied).
        """
        kept = 0
        for name in sorted(names, key=step_of, reverse=True):
            info = self.checked(location, name, folder)
            if info is not None and not self.owns(info):
                continue
            if kept >= self.keep:
                if name not in protect and (info is not None or location == "local"):
                    delete(name)
                    self.verified.pop((location, name), None)
                    self.unverified.discard(name)
                    log.info("removed old checkpoint %s (%s)", name, location)
                continue
            kept += info is not None
