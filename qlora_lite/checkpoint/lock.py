"""An exclusive lock on a run folder, so two processes never train into the same folder.

Two notebook cells, or a re-run while the first run still runs, would otherwise race in publishing and
rotate each other's checkpoints away. The lock is an `flock` on `<run>/.qlora-lite.lock`: the kernel drops it
when its process dies (a crash, SIGKILL, a VM gone), so a stale lock never blocks a re-run. The file names
the owner (pid, host, start time) for the message the second process shows. Where a file system has no
flock (some network mounts), the owner written in the file decides: a dead pid on this host is stale.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from qlora_lite.errors import UserError
from qlora_lite.run_files import LOCK_FILE

_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def pid_alive(pid: int) -> bool:
    """True when process `pid` exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _owner(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096) or b"{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: dict) -> str:
    if not owner:
        return "another process"
    started = owner.get("started_unix")
    since = f", since {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}" if started else ""
    return f"process {owner.get('pid')} on {owner.get('host')}{since}"


class RunLock:
    """`with RunLock(run_dir):` holds the run folder or raises UserError naming the process that holds it."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._refuse(_owner(fd))
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
                owner = _owner(fd)  # no flock here: trust the owner written in the file unless it is dead
                if owner.get("host") == socket.gethostname() and owner.get("pid") not in (None, os.getpid()):
                    if pid_alive(int(owner["pid"])):
                        self._refuse(owner)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started_unix": time.time()}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _refuse(self, owner: dict) -> None:
        raise UserError(
            f"run folder {self.folder} is in use by {_describe(owner)}: wait for that run to finish or stop "
            "it, or give this run another --output (output_dir)"
        )

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # the file stays (unlinking a locked file races with the next owner)
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
