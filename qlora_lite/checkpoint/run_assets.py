"""Folders of a run that are not checkpoints but must reach the durable place too (a LoftQ run's base).

Each is a folder with a manifest.json (the checkpoint format), uploaded once under its own name: `list()` of
every backend shows checkpoints only, so rotation never removes it. A failed copy is a warning, as for
checkpoints, and is retried after each later checkpoint copy (the durable place works again then) until it
lands.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from qlora_lite.checkpoint.copier import describe_error
from qlora_lite.checkpoint.durable import DurableBackend

log = logging.getLogger(__name__)


class RunAssets:
    """The run's non-checkpoint folders still to copy to `backend`."""

    def __init__(self, backend: DurableBackend | None) -> None:
        self.backend = backend
        self._waiting: dict[str, Path] = {}
        self._lock = threading.Lock()  # the training thread adds, the copy thread retries

    def copy(self, folder: Path, name: str) -> bool:
        """Upload `folder` as `name` now; on failure keep it for `retry()`. True when it is there."""
        if self.backend is None:
            return False
        with self._lock:
            self._waiting[name] = folder
        return name not in self.retry()

    def retry(self) -> list[str]:
        """Try every waiting folder again; returns the names still waiting."""
        backend = self.backend
        with self._lock:
            for name, folder in list(self._waiting.items()):
                assert backend is not None
                try:
                    backend.upload(folder, name)
                except Exception as exc:  # noqa: BLE001 (a durable fault never stops training)
                    log.warning(
                        "could not copy %s to %s (%s): retried after the next checkpoint copy",
                        name, backend.description, describe_error(exc),
                    )  # fmt: skip
                    continue
                del self._waiting[name]
                log.info("copied %s to %s (verified)", name, backend.description)
            return list(self._waiting)
