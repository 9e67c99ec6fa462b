"""Runs one `qlora_lite.train` call in a subprocess for the kill/resume tests, optionally SIGKILLing itself.

argv[1] is JSON: {"model", "data", "out", "settings", "kill_at_forward": N | null, "kill_after_seconds": S | null,
"pause_at_step": N | null, "pause_dir": folder, "kill_rank": R | null, "oom_at_forward": [N, ...]}. With
pause_at_step, it writes `<pause_dir>/paused` at the end of that step and waits until `<pause_dir>/go` exists.
Under torchrun, the kill (and the injected out-of-memory errors) happen only on rank `kill_rank` (default:
every rank).
Prints one JSON line with the result's metrics and resumed_from_step when it finishes (rank 0 only).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, like a Colab VM vanishing


class Killer:
    def __init__(self, at_forward: int | None, after_seconds: float | None, oom_at=()) -> None:
        self.at_forward, self.after_seconds, self.count = at_forward, after_seconds, 0
        self.oom_at = set(oom_at)

    def on_model_ready(self, model) -> None:
        if self.after_seconds is not None:
            threading.Timer(self.after_seconds, die).start()
        if self.at_forward is None and not self.oom_at:
            return

        def hook(module, args):
            if module.training:
                self.count += 1
                if self.count == self.at_forward:
                    die()
                if self.count in self.oom_at:
                    import torch

                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

        model.get_base_model().model.layers[0].register_forward_pre_hook(hook)


class Pause:
    def __init__(self, at_step: int | None, folder: str | None) -> None:
        self.at_step, self.folder = at_step, Path(folder) if folder else None

    def on_step_end(self, state) -> None:
        if state.step != self.at_step:
            return
        (self.folder / "paused").write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while not (self.folder / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def main() -> None:
    job = json.loads(sys.argv[1])
    import qlora_lite

    rank = int(os.environ.get("RANK", 0))
    callbacks: list = [Pause(job.get("pause_at_step"), job.get("pause_dir"))]
    if job.get("kill_rank") in (None, rank):
        callbacks.append(
            Killer(job.get("kill_at_forward"), job.get("kill_after_seconds"), job.get("oom_at_forward", ()))
        )
    result = qlora_lite.train(job["model"], job["data"], job["out"], callbacks=callbacks, **job["settings"])
    if rank == 0:
        print(json.dumps({"metrics": result.metrics, "resumed_from_step": result.resumed_from_step}))


if __name__ == "__main__":
    main()
