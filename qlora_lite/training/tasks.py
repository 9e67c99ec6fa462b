"""The task interface: what differs between training a causal LM and a classifier, and nothing more.

`training.run.run(config, task)` does everything every task shares: the output folder, hardware, the plan,
checkpoints and exact resume, the loop (fixed examples per step, loss normalised over the step, OOM backoff),
the run record and the push. A task says how to read and encode its data, which model head to load, how a
micro-batch becomes a loss, what to evaluate during training, and what to add when training ends.
Implementations: `task_causal_lm.CausalLM`, `task_classifier.Classification`; a new task is one more module
with these methods and an entry in `task_for`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from qlora_lite.checkpoint.store import CheckpointInfo
from qlora_lite.config import TrainConfig
from qlora_lite.training.loop import LoopState, Objective, StepRunner


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    run_record: Path
    loss_plot: Path | None
    metrics: dict[str, Any]
    plan: Any = field(repr=False)
    resumed_from_step: int | None = None


@dataclass
class TaskData:
    """What a task read and checked before any file is written."""

    spec: Any  # the data format (name, columns, reason)
    fingerprint: str
    n_records: int
    identity: dict[str, Any] = field(default_factory=dict)  # added to the run's identity
    run_config: dict[str, Any] = field(default_factory=dict)  # added to run_config.json (for `resume`)
    record: dict[str, Any] = field(default_factory=dict)  # added to the run record's "data" entry


@dataclass
class PreparedData:
    """Encoded examples. `lengths` are the untruncated token counts the planner sizes the run from."""

    spec: Any
    fingerprint: str
    train: list
    eval: list
    stats: Any  # n_truncated, n_dropped
    n_records: int
    eval_conversations: list = field(default_factory=list)
    router_sample: list = field(default_factory=list)  # training prompts kept in the record for routing
    lengths: list[int] = field(default_factory=list)


@dataclass
class Finished:
    """What a task adds when training ends: metrics, run-record entries."""

    metrics: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    drop_metrics: tuple[str, ...] = ()


class Task(Protocol):
    name: str  # "causal_lm" | "classification": the planner's task and the run record's
    title: str  # the loss plot's title after the model name
    files: tuple[str, ...]  # run-folder files besides run_files.RUN_FILES that `overwrite` removes
    result_type: type  # TrainResult or a subclass
    distributed: bool  # whether it can train under torchrun / accelerate launch (training/distributed.py)

    def read(self, config: TrainConfig) -> TaskData:
        """Read and check the data; raise UserError before anything is written."""

    def check_checkpoint(self, latest: CheckpointInfo) -> None:
        """Refuse a checkpoint this task cannot continue, even when `resume="force"`."""

    def prepare(self, tokenizer: Any, max_seq_length: int | None) -> PreparedData:
        """Encode the data read by `read` (None: untruncated, to measure lengths for the planner)."""

    def plan_knobs(self) -> dict[str, Any]:
        """Knobs the task fixes for the planner (the head: task, num_labels)."""

    def load_model(self, source: Any, plan: Any, accelerator: str, tokenizer: Any) -> tuple[Any, dict]:
        """(base model with the task's head, keyword arguments for `attach_lora`); `source` is the resolved
        model (model.source.ModelSource: a folder, or a Hub id pinned to a commit)."""

    def objective(self, device: torch.device) -> Objective:
        """How a micro-batch becomes a loss, normalised over the whole step."""

    def evaluate(self, runner: StepRunner, prepared: PreparedData, state: LoopState) -> dict | None:
        """A periodic evaluation during training: a step-log row, or None when there is nothing to score."""

    def finish(
        self,
        model: Any,
        tokenizer: Any,
        prepared: PreparedData,
        runner: StepRunner,
        state: LoopState,
        out: Path,
    ) -> Finished:
        """After the last step: final evaluation, extra files, what goes into metrics and the record."""

    def result_fields(self, out: Path, record: dict) -> dict[str, Any]:
        """Fields of `result_type` beyond TrainResult's, from the run record."""
