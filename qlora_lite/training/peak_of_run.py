"""The measured peak memory of a training run, recorded next to the planner's prediction.

On CUDA it is `torch.cuda.max_memory_allocated` over every step of the process. On CPU PyTorch keeps no
allocator statistics, and the tracker of `planner.peak` (a dispatch mode watching every op) slows a step down,
so only the first two optimizer steps of a process are tracked: the first creates the optimizer state, the
second runs with it, and the longest micro-batch has already been through the probe. A resumed run keeps the
larger of its processes' peaks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from qlora_lite.planner.peak import track_peak

TRACKED_CPU_STEPS = 2


class PeakOfRun:
    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.steps = 0
        self.peak = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def measure(self, runner, state) -> Iterator[None]:
        """Around one optimizer step."""
        self.steps += 1
        if self.device.type != "cpu" or self.steps > TRACKED_CPU_STEPS:
            yield
            return
        with track_peak("cpu", [runner.model, runner.optimizer]) as result:
            yield
        self.peak = max(self.peak, result.peak_bytes)

    def finish(self, state) -> None:
        """Store the peak in the loop state (saved with checkpoints, so a resumed run keeps the maximum)."""
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            how = "torch.cuda.max_memory_allocated over the run"
        elif self.device.type == "cpu":
            how = f"live tensors during the first {TRACKED_CPU_STEPS} optimizer steps (planner.peak tracker)"
        else:
            return
        if self.peak:
            state.measured_peak_bytes = max(self.peak, state.measured_peak_bytes or 0)
            state.measured_peak_how = how
