"""The training loop: a fixed data order per optimizer step, loss normalised over the whole step, and
out-of-memory backoff that halves the micro-batch without changing what a step sees.

Why a plain loop rather than the HF Trainer: every optimizer step is defined by the examples it consumes
(a seeded permutation per epoch, cut into groups of `effective_batch_size`). Splitting a group into more,
smaller micro-batches changes nothing the optimizer sees, because each micro-batch's loss is divided by the
number of supervised tokens in the whole step. That makes OOM backoff and exact resume simple and exact.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from qlora_lite.data.encoding import IGNORE_INDEX  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

T = TypeVar("T")


class Objective(Protocol):
    """What a task's loss needs from the loop: how to batch its examples and how to score a micro-batch.

    `loss` returns the micro-batch's summed loss divided by `denominator`, the normaliser of the whole
    optimizer step, so that the gradient of a step does not depend on how it is split into micro-batches.
    """

    def collate(self, batch: Sequence[Any], pad_token_id: int, device: torch.device | str) -> dict: ...

    def denominator(self, batch: Sequence[Any]) -> float: ...

    def loss(self, model: torch.nn.Module, batch: dict, denominator: float) -> torch.Tensor: ...


@dataclass
class LoopState:
    """Everything that says where training is; checkpoints save it, resume restores it."""

    step: int = 0  # optimizer steps done
    examples_seen: int = 0
    tokens_seen: int = 0
    micro_batch_size: int = 1
    oom_backoffs: int = 0
    history: list[dict] = field(default_factory=list)  # one row per optimizer step
    eval_history: list[dict] = field(default_factory=list)
    # early stopping / best adapter (training.early_stopping): restored on resume like the rest
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early_at: int | None = None
    # measured peak memory of this run (training.peak_of_run), next to the planner's prediction in the record
    measured_peak_bytes: int | None = None
    measured_peak_how: str | None = None


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    order = list(range(n_examples))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def steps_per_epoch(n_examples: int, effective_batch_size: int) -> int:
    return math.ceil(n_examples / effective_batch_size)


def step_examples(step: int, n_examples: int, effective_batch_size: int, seed: int) -> list[int]:
    """Indices of the examples optimizer step `step` (0-based) consumes; the last group of an epoch is short."""
    per_epoch = steps_per_epoch(n_examples, effective_batch_size)
    epoch, within = divmod(step, per_epoch)
    order = epoch_order(n_examples, seed, epoch)
    return order[within * effective_batch_size : (within + 1) * effective_batch_size]


def split_micro_batches(
    indices: Sequence[int], examples: Sequence[Any], micro_batch_size: int
) -> list[list[int]]:
    """Cut one step's examples into micro-batches of similar length (less padding); deterministic."""
    by_length = sorted(indices, key=lambda i: (len(examples[i].input_ids), i))
    return [by_length[i : i + micro_batch_size] for i in range(0, len(by_length), micro_batch_size)]


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class OutOfMemoryAtMicroBatchOne(RuntimeError):
    """Raised when a step does not fit even one example at a time."""


@dataclass
class StepRunner:
    """Runs one optimizer step over a fixed set of examples, backing off on out-of-memory errors.

    The task's `objective` says how examples become a batch and a loss.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    examples: Sequence[Any]
    pad_token_id: int
    device: torch.device | str
    objective: Objective
    max_grad_norm: float | None = 1.0
    autocast_dtype: torch.dtype | None = None
    grad_scaler: torch.amp.GradScaler | None = None
    on_backoff: Callable[[int, int], None] | None = None  # (old, new) micro-batch size
    # Several ranks (training/distributed.py): `local(indices, step)` is this rank's share of a step,
    # `reduce(loss, optimizer)` sums gradients and loss over the ranks. None: one process.
    data_parallel: Any = None

    def _forward_backward(
        self, indices: Sequence[int], micro_batch_size: int, denominator: float | None = None
    ) -> float:
        if denominator is None:
            denominator = self.objective.denominator([self.examples[i] for i in indices])
        total = 0.0
        for micro in split_micro_batches(indices, self.examples, micro_batch_size):
            batch = self.objective.collate([self.examples[i] for i in micro], self.pad_token_id, self.device)
            with autocast(self.device, self.autocast_dtype):
                # The micro-batch's loss sum / the whole step's normaliser: the split does not matter.
                loss = self.objective.loss(self.model, batch, denominator)
            (self.grad_scaler.scale(loss) if self.grad_scaler else loss).backward()
            total += float(loss.detach())
        return total

    def run(self, indices: Sequence[int], state: LoopState, *, apply: bool = True) -> float:
        """Forward/backward all micro-batches of one step, then (if `apply`) one optimizer step.

        On out-of-memory: drop the partial gradients, restore the RNG as it was at the start of the step,
        halve the micro-batch (accumulation doubles implicitly) and redo the same step.
        """
        denominator = self.objective.denominator([self.examples[i] for i in indices])
        sharded = self.data_parallel is not None and apply  # the probe (apply=False) stays local
        if sharded:
            indices = self.data_parallel.local(indices, state.step)
        rng_state = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        while True:
            try:
                loss = self._forward_backward(indices, state.micro_batch_size, denominator)
                break
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                del exc
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if state.micro_batch_size == 1:
                    raise OutOfMemoryAtMicroBatchOne(
                        "out of memory at micro-batch 1: lower --max-seq-length, turn on "
                        "--gradient-checkpointing, or use --quantization nf4"
                    ) from None
                old = state.micro_batch_size
                state.micro_batch_size = max(1, old // 2)
                state.oom_backoffs += 1
                log.warning(
                    "out of memory at micro-batch %d: retrying this step at %d", old, state.micro_batch_size
                )
                if self.on_backoff:
                    self.on_backoff(old, state.micro_batch_size)
                torch.random.set_rng_state(rng_state)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
        if not apply:
            self.optimizer.zero_grad(set_to_none=True)
            torch.random.set_rng_state(rng_state)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            return loss
        if sharded:
            loss = self.data_parallel.reduce(loss, self.optimizer)
        if self.grad_scaler:
            self.grad_scaler.unscale_(self.optimizer)
        if self.max_grad_norm:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if self.grad_scaler:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def eval_halving_batch_on_oom(
    model: torch.nn.Module, batch_size: int, run_pass: Callable[[int], T], what: str
) -> T:
    """Run `run_pass(batch_size)` in eval mode; on out-of-memory retry it at half the batch (down to 1)."""
    was_training = model.training
    model.eval()
    try:
        while True:
            try:
                return run_pass(batch_size)
            except Exception as exc:
                if not is_out_of_memory(exc) or batch_size == 1:
                    raise
                batch_size //= 2
                log.warning("out of memory during %s: retrying at batch %d", what, batch_size)
    finally:
        model.train(was_training)


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """Mixed precision in `dtype` on the device, or nothing when `dtype` is None (fp32, CPU)."""
    return torch.autocast(
        device_type=torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None
    )


class Throughput:
    """Non-padding tokens per second over the run so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    @property
    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.tokens / elapsed if elapsed > 0 else 0.0
