"""Copies published checkpoints to a durable place, in one background thread, so training never waits.

Only the newest checkpoint matters: a newer one replaces a queued older one. A failed copy (Drive
unmounted, quota full, I/O error) is reported once, then retried with a bounded backoff and at once on
the next save; the first success after a failure is reported too.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable

from qlora_lite.checkpoint.durable import DurableBackend
from qlora_lite.checkpoint.manifest import CheckpointInfo

log = logging.getLogger(__name__)


def describe_error(exc: BaseException) -> str:
    """'Transport endpoint is not connected [ENOTCONN]' for an OSError, 'Type: message' otherwise."""
    if isinstance(exc, OSError) and exc.errno in errno.errorcode:
        text = exc.strerror or str(exc)
        if exc.filename and str(exc.filename) not in text:
            text += f": {exc.filename}"
        return f"{text} [{errno.errorcode[exc.errno]}]"
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"  # one line (HTTP errors carry several)


class DurableCopier:
    """Uploads the newest submitted checkpoint; `on_copied(info)` runs after each verified upload."""

    def __init__(
        self,
        backend: DurableBackend,
        background: bool = True,
        retry_seconds: tuple[float, float] = (5.0, 300.0),
        on_copied: Callable[[CheckpointInfo], None] | None = None,
    ):
        self.backend = backend
        self.background = background
        self.retry_seconds = retry_seconds
        self.on_copied = on_copied
        self.last_error: str | None = None
        self.durable_step: int | None = None  # newest step copied and verified by this process
        self._cond = threading.Condition()
        self._pending: CheckpointInfo | None = None
        self._busy: str | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._retry_now = False
        self._started = 0
        self._finished = 0
        self._stop = False
        self._thread: threading.Thread | None = None

    def protected(self) -> set[str]:
        """Names being copied or waiting to be: local rotation must not delete them."""
        with self._cond:
            return {info.name for info in (self._pending,) if info} | ({self._busy} if self._busy else set())

    def submit(self, info: CheckpointInfo) -> None:
        """Copy `info` (replacing an older queued checkpoint); in the background unless background=False."""
        with self._cond:
            if self._pending is None or info.step >= self._pending.step:
                self._pending = info
            self._retry_now = True
            if self.background and self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="qlora-lite-durable-copy", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        if not self.background:
            self._copy_pending()

    def _copy_pending(self) -> None:
        with self._cond:
            job, self._pending = self._pending, None
            if job is None:
                return
            self._busy = job.name
            self._started += 1
        ok = self._copy_one(job)
        with self._cond:
            self._busy = None
            if not ok and self._pending is None:
                self._pending = job  # retried later unless a newer checkpoint arrives first
            self._finished += 1
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stop:
                    if self._pending is not None:
                        wait = self._retry_at - time.monotonic()
                        if self._retry_now or wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._stop:
                    return
                self._retry_now = False
            self._copy_pending()

    def _copy_one(self, job: CheckpointInfo) -> bool:
        try:
            if (
                not job.path.is_dir()
            ):  # queued checkpoints are protected from rotation: something else took it
                raise FileNotFoundError(
                    errno.ENOENT, "the local checkpoint vanished before it was copied", str(job.path)
                )
            self.backend.upload(job.path, job.name)
        except Exception as exc:  # noqa: BLE001 - a durable fault must never reach training
            self._failed(job, exc)
            return not job.path.is_dir()  # a vanished folder is not retried (the next save is), nor a success
        with self._cond:
            recovered, self.last_error, self._failures = self.last_error, None, 0
            self.durable_step = max(job.step, self.durable_step or 0)
        if recovered:
            log.warning("the durable copy works again: %s is in %s", job.name, self.backend.description)
        else:
            log.info("copied %s to %s (verified)", job.name, self.backend.description)
        if self.on_copied is not None:
            try:
                self.on_copied(job)
            except Exception:  # noqa: BLE001
                log.exception("after copying %s to %s", job.name, self.backend.description)
        return True

    def _failed(self, job: CheckpointInfo, exc: BaseException) -> None:
        with self._cond:
            self._failures += 1
            first, most = self.retry_seconds
            self._retry_at = time.monotonic() + min(first * 2 ** (self._failures - 1), most)
            first_failure = self.last_error is None
            self.last_error = f"{job.name} -> {self.backend.description}: {describe_error(exc)}"
        if first_failure:
            log.warning(
                "could not copy %s to the durable place %s: %s. Training goes on; the checkpoints already "
                "there are intact; the copy is retried at the next save or within %.0f s (reported once).",
                job.name,
                self.backend.description,
                describe_error(exc),
                most,
            )
        else:
            log.debug("durable copy retry %d failed: %s", self._failures, self.last_error)

    def flush(self, timeout: float | None = None) -> bool:
        """Try the pending copy now and wait for it; True when nothing is left to copy and it worked.

        Returns False after one failed try (without waiting for the backoff) or at `timeout`.
        """
        if not self.background:
            self._copy_pending()
            return self._pending is None and self.last_error is None
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._started + 1
            self._retry_now = True
            self._cond.notify_all()
            while self._pending is not None or self._busy is not None:
                if self._finished >= target and self._busy is None and self.last_error is not None:
                    break  # tried again after this call and failed
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._pending is None and self._busy is None and self.last_error is None

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the worker thread; returns flush()'s answer."""
        ok = self.flush(timeout)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)  # a hung mount must not hang the caller; the thread is a daemon
            self._thread = None
        return ok
