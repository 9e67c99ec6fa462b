"""Ctrl-C and SIGTERM during training: finish the current optimizer step, save, then stop.

An interrupt raised mid-step would leave the state half-way: after `optimizer.step()` but before the step
counter moves, a checkpoint would hold step N+1's weights as step N, and resume would apply that step twice;
inside the forward pass the RNG has moved on. So the interrupt is only noted, and acted on at the next step
boundary (`Checkpointer.at_step_end`), where a checkpoint is exact. Colab and Kaggle send SIGTERM when they
shut a VM down; it is handled the same way. A second interrupt stops at once, without saving.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DeferredInterrupts:
    """`with DeferredInterrupts() as interrupts:` notes SIGINT/SIGTERM; `stop()` raises the interrupt.

    Outside the main thread (where Python cannot install signal handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.pending: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.pending is not None:
            log.warning("interrupted again: stopping now, without saving")
            self._raise(signum)
        self.pending = signum
        log.warning(
            "%s: finishing this step, saving a checkpoint, then stopping (interrupt again to stop at once, "
            "without saving)",
            signal.Signals(signum).name,
        )

    @staticmethod
    def _raise(signum: int) -> None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)  # the exit status of a process ended by that signal

    def stop(self) -> None:
        """Raise the pending interrupt (KeyboardInterrupt for SIGINT, SystemExit for SIGTERM)."""
        if self.pending is not None:
            self._raise(self.pending)

    def __enter__(self) -> DeferredInterrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                previous = signal.getsignal(signum)  # None: installed outside Python; restore the default
                signal.signal(signum, self._handle)
                self._previous[signum] = signal.SIG_DFL if previous is None else previous
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
