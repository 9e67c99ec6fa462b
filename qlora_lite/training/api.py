"""The public training entry points: `train()` (the data's format picks the task) and `train_classifier()`.

Both build a TrainConfig and hand it, with a task, to the one trainer `training.run.run`.
"""

from __future__ import annotations

import logging
from typing import Any

from qlora_lite.config import TrainConfig, make_config
from qlora_lite.data import formats as data_mod
from qlora_lite.data.hub_dataset import pin_data_source
from qlora_lite.training.run import run
from qlora_lite.training.task_causal_lm import CausalLM
from qlora_lite.training.task_classifier import Classification, ClassifierResult
from qlora_lite.training.tasks import Task, TrainResult


def show_progress_messages() -> None:
    """Make the plan and progress messages visible in a notebook or script that configured no logging.

    Nothing changes when the application (the CLI, pytest, the user) has set up logging itself.
    """
    package = logging.getLogger("qlora_lite")
    if logging.getLogger().handlers or package.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)


def task_for(config: TrainConfig) -> Task:
    """The task the data asks for: labelled texts train a classifier, everything else a causal LM.

    The file is read once here; the causal-LM task keeps the records it was given.
    """
    source = pin_data_source(config.data, config.data_config, config.data_split)  # a Hub data set: its commit
    records, spec = data_mod.load_dataset_for_training(source, format=config.format, columns=config.columns)
    if spec.task == "classification":
        return Classification()
    return CausalLM(records, spec, source)


def train(model: str, data: Any, output_dir: str, **overrides: Any) -> TrainResult:
    """Fine-tune `model` on `data` with LoRA/QLoRA and save the adapter in `output_dir`.

    `overrides` are TrainConfig fields (e.g. max_steps=60, learning_rate=1e-4, micro_batch_size=4);
    planner knobs left unset are chosen by the planner, which prints why. Re-running the same call after
    an interruption resumes from the newest verified checkpoint.
    """
    show_progress_messages()
    config = make_config(model, data, output_dir, **overrides)
    return run(config, task_for(config))


def run_classifier(
    config: TrainConfig,
    *,
    labels: list | None = None,
    class_weights: str | dict | None = None,
    eval_data: Any = None,
) -> ClassifierResult:
    """`train_classifier` for a ready TrainConfig (what `qlora-lite resume` calls for a classifier run)."""
    return run(config, Classification(labels, class_weights, eval_data))


def train_classifier(
    model: str,
    data: Any,
    output_dir: str,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    labels: list | None = None,
    class_weights: str | dict | None = None,
    eval_data: Any = None,
    **overrides: Any,
) -> ClassifierResult:
    """Fine-tune `model` with LoRA and a classification head on labelled texts; save both in `output_dir`.

    `labels` fixes the label order (ids); default: sorted. `class_weights`: None, "balanced" or
    {label: weight}. `eval_data`: a separate held-out set (default: a stratified `eval_fraction` split).
    `overrides` are TrainConfig fields (max_steps, learning_rate, quantization, ...). Re-running the same
    call resumes an interrupted run.
    """
    columns = dict(overrides.pop("columns", None) or {})
    if text_column:
        columns["text"] = text_column
    if label_column:
        columns["label"] = label_column
    config = make_config(model, data, output_dir, columns=columns or None, **overrides)
    show_progress_messages()
    return run_classifier(config, labels=labels, class_weights=class_weights, eval_data=eval_data)
