"""The public training entry points: `train()` (the data's format picks the task) and `train_classifier()`.

Both build a TrainConfig and hand it, with a task, to the one trainer `training.run.run`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from qlora_lite.config import TrainConfig, make_config
from qlora_lite.data import formats as data_mod
from qlora_lite.data.hub_dataset import pin_data_source
from qlora_lite.errors import UserError
from qlora_lite.options import CLASSIFY, TRAIN
from qlora_lite.recipe import apply_recipe
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


def train(
    model: str | None = None,
    data: Any = None,
    output_dir: str | None = None,
    *,
    config: str | os.PathLike | None = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune `model` on `data` with LoRA/QLoRA and save the adapter in `output_dir`.

    `config`: a YAML recipe giving any of these and of the settings (Hugging Face names accepted); the
    arguments given here override it.

    `overrides` are TrainConfig fields (e.g. max_steps=60, learning_rate=1e-4, micro_batch_size=4);
    planner knobs left unset are chosen by the planner, which prints why. Re-running the same call after
    an interruption resumes from the newest verified checkpoint.
    """
    show_progress_messages()
    model, data, output_dir, overrides = with_recipe(config, model, data, output_dir, overrides, TRAIN)
    train_config = make_config(model, data, output_dir, **overrides)
    return run(train_config, task_for(train_config))


def with_recipe(recipe, model, data, output_dir, overrides: dict[str, Any], command: str):
    """(model, data, output_dir, settings): the recipe's values under the arguments given."""
    places = {"model": model, "data": data, "output_dir": output_dir}
    places, settings = apply_recipe(recipe, places, overrides, command)
    missing = [name for name, value in places.items() if value is None]
    if missing:
        raise UserError(f"train() needs {', '.join(missing)}: pass it, or set it in the recipe")
    return places["model"], places["data"], places["output_dir"], settings


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
    model: str | None = None,
    data: Any = None,
    output_dir: str | None = None,
    *,
    config: str | os.PathLike | None = None,
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
    model, data, output_dir, overrides = with_recipe(config, model, data, output_dir, overrides, CLASSIFY)
    columns = dict(overrides.pop("columns", None) or {})
    if text_column:
        columns["text"] = text_column
    if label_column:
        columns["label"] = label_column
    train_config = make_config(model, data, output_dir, columns=columns or None, **overrides)
    show_progress_messages()
    return run_classifier(train_config, labels=labels, class_weights=class_weights, eval_data=eval_data)
