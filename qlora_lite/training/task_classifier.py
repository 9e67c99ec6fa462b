"""The classification task: labelled texts -> LoRA + a trained head -> labels with probabilities.

It plugs into the one trainer (`training.run.run`) through the task interface: the planner sizes a head of
`num_labels` outputs instead of vocabulary logits, the loss is a (class-weighted) cross-entropy over the labels,
periodic evaluation reports held-out accuracy, and the end of the run adds the held-out evaluation, a confusion
matrix and `labels.json`. The head is saved with the adapter through PEFT's `modules_to_save`, so the folder
loads with plain `PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base,
num_labels=N), run_dir)`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qlora_lite.data import labels as cdata
from qlora_lite.data.labels import ClassifierExample
from qlora_lite.errors import UserError
from qlora_lite.model.loading import CLASSIFIER_HEADS, load_classification_base
from qlora_lite.run_files import CONFUSION_PLOT, LABELS_FILE, RUN_RECORD
from qlora_lite.training.evaluation import (
    classification_metrics,
    format_classification_table,
    majority_baseline,
    plot_confusion_matrix,
)
from qlora_lite.training.loop import (
    LoopState,
    StepRunner,
    autocast,
    eval_halving_batch_on_oom,
    split_micro_batches,
)
from qlora_lite.training.record import write_json_atomic
from qlora_lite.training.tasks import Finished, PreparedData, TaskData, TrainResult

log = logging.getLogger(__name__)

HEAD_NAMES = CLASSIFIER_HEADS
PERIODIC_EVAL_EXAMPLES = 256  # evaluations during training use at most this many held-out texts


@dataclass(frozen=True)
class ClassifierResult(TrainResult):
    labels: tuple = ()
    evaluation: dict[str, Any] | None = field(default=None, repr=False)
    confusion_matrix: Path | None = None


def collate(batch: Sequence[ClassifierExample], pad_token_id: int, device: torch.device | str) -> dict:
    """Right-pad to the longest text; the models find the last real token from the attention mask/pad id."""
    width = max(len(e.input_ids) for e in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        input_ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        attention_mask[row, : len(example.input_ids)] = 1
    labels = torch.tensor([e.label for e in batch], dtype=torch.long)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


@dataclass
class ClassificationObjective:
    """sum(weight[y] * CE) of a micro-batch / the summed weights of the whole step's examples.

    Without class weights every weight is 1 and the denominator is the number of examples in the step, so
    the step's gradient does not depend on how it is split into micro-batches.
    """

    class_weights: torch.Tensor | None = None
    collate = staticmethod(collate)

    def denominator(self, batch: Sequence[ClassifierExample]) -> float:
        if self.class_weights is None:
            return len(batch)
        return float(sum(self.class_weights[e.label] for e in batch))

    def loss(self, model: torch.nn.Module, batch: dict, denominator: float) -> torch.Tensor:
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.float(), labels, weight=self.class_weights, reduction="sum")
        return loss / denominator


@torch.no_grad()
def predict_logits(
    model, examples: list[ClassifierExample], pad_token_id: int, device, batch_size: int, autocast_dtype=None
) -> torch.Tensor:
    """Logits (float32, on CPU) for every example in order; halves the batch on out-of-memory."""

    def run_pass(size: int) -> torch.Tensor:
        out = torch.empty((len(examples), model.config.num_labels))
        for micro in split_micro_batches(range(len(examples)), examples, size):
            batch = collate([examples[i] for i in micro], pad_token_id, device)
            batch.pop("labels")
            with autocast(device, autocast_dtype):
                out[micro] = model(**batch).logits.float().cpu()
        return out

    return eval_halving_batch_on_oom(model, batch_size, run_pass, "prediction")


def evaluate_examples(
    model, examples, mapping: cdata.LabelMapping, pad_token_id, device, batch_size, dtype=None
):
    """(metrics dict, eval loss) on held-out examples: accuracy, macro-F1, per-class scores, confusion."""
    logits = predict_logits(model, examples, pad_token_id, device, batch_size, dtype)
    truth = torch.tensor([e.label for e in examples])
    loss = float(F.cross_entropy(logits, truth))
    metrics = classification_metrics(truth.tolist(), logits.argmax(-1).tolist(), mapping.names)
    return metrics, loss


class Classification:
    """Labelled texts (decoder or encoder models): a head over `num_labels` classes, trained with LoRA."""

    name = "classification"
    title = "LoRA classifier"
    files = (LABELS_FILE, CONFUSION_PLOT)
    result_type = ClassifierResult
    distributed = False

    def __init__(
        self, labels: list | None = None, class_weights: str | dict | None = None, eval_data: Any = None
    ) -> None:
        self.labels, self.class_weights, self.eval_data = labels, class_weights, eval_data
        self.data: cdata.LabeledData | None = None
        self.weights: list[float] | None = None
        self.heads: list[str] = []
        self.display_name = ""

    def read(self, config) -> TaskData:
        data = cdata.load_labeled_data(config, labels=self.labels, eval_data=self.eval_data)
        self.data = data
        self.weights = cdata.resolve_class_weights(self.class_weights, data.mapping, data.train_ids)
        cdata.log_distribution(data, self.weights)
        if not config.overwrite:
            cdata.check_saved_labels(Path(config.output_dir).expanduser() / RUN_RECORD, data.mapping)
        eval_source = self.eval_data if isinstance(self.eval_data, str) else None
        # A Hub data set: its id and the commit the records came from go into the record's "data".
        described = data.source.describe() if hasattr(data.source, "describe") else {}
        return TaskData(
            data.spec, data.fingerprint, data.n_records, record=described,
            identity={"classification": {"labels": list(data.mapping.names), "class_weights": self.weights}},
            run_config={"classifier": {"labels": self.labels, "class_weights": self.class_weights, "eval_data": eval_source}},
        )  # fmt: skip

    def check_checkpoint(self, latest) -> None:
        cdata.check_checkpoint_labels(
            latest, self.data.mapping
        )  # never forced: the head would mean other labels

    def prepare(self, tokenizer, max_seq_length: int | None) -> PreparedData:
        data = self.data
        if max_seq_length is None:  # the planner only needs the lengths
            lengths = [
                len(ids) for ids in tokenizer([t for t, _ in data.train], truncation=False)["input_ids"]
            ]
            return PreparedData(data.spec, data.fingerprint, [], [], None, data.n_records, lengths=lengths)
        train, n_truncated = cdata.encode(data.train, data.mapping, tokenizer, max_seq_length)
        held, _ = cdata.encode(data.eval, data.mapping, tokenizer, max_seq_length)
        stats = _Stats(n_truncated=n_truncated, n_dropped=0)
        return PreparedData(data.spec, data.fingerprint, train, held, stats, data.n_records)

    def plan_knobs(self) -> dict[str, Any]:
        return {"task": "classification", "num_labels": len(self.data.mapping)}

    def load_model(self, source, plan, accelerator: str, tokenizer) -> tuple[Any, dict]:
        self.display_name = source.display_name
        base = load_classification_base(
            source.name, revision=source.revision, quantization=plan.quantization, double_quant=plan.double_quant,
            compute_dtype=plan.compute_dtype, accelerator=accelerator, attn_implementation=plan.attn_implementation,
            **self.data.mapping.config_kwargs(tokenizer.pad_token_id),
        )  # fmt: skip
        self.heads = [name for name in HEAD_NAMES if isinstance(getattr(base, name, None), torch.nn.Module)]
        if not self.heads:
            raise UserError(
                f"{source.name}: its sequence-classification model has no 'score' or 'classifier' head"
            )
        return base, {"task": "classification", "modules_to_save": self.heads}

    def objective(self, device) -> ClassificationObjective:
        weights = torch.tensor(self.weights, device=device) if self.weights else None
        return ClassificationObjective(weights)

    def evaluate(self, runner: StepRunner, prepared: PreparedData, state: LoopState) -> dict | None:
        periodic = prepared.eval[:PERIODIC_EVAL_EXAMPLES]
        if not periodic:
            return None
        metrics, eval_loss = evaluate_examples(
            runner.model, periodic, self.data.mapping, runner.pad_token_id, runner.device,
            state.micro_batch_size, runner.autocast_dtype,
        )  # fmt: skip
        return {
            "step": state.step,
            "eval_loss": round(eval_loss, 6),
            "eval_accuracy": round(metrics["accuracy"], 4),
        }

    def finish(self, model, tokenizer, prepared: PreparedData, runner, state, out: Path) -> Finished:
        data = self.data
        evaluation, metrics = None, {}
        if prepared.eval:
            evaluation, eval_loss = evaluate_examples(
                model, prepared.eval, data.mapping, tokenizer.pad_token_id, runner.device,
                state.micro_batch_size, runner.autocast_dtype,
            )  # fmt: skip
            evaluation["majority_baseline_accuracy"] = majority_baseline(
                data.train_ids, [e.label for e in prepared.eval]
            )
            metrics = dict(
                eval_loss=round(eval_loss, 6), eval_accuracy=evaluation["accuracy"], eval_macro_f1=evaluation["macro_f1"],
                majority_baseline_accuracy=evaluation["majority_baseline_accuracy"],
            )  # fmt: skip
            log.info("held-out evaluation:\n%s", format_classification_table(evaluation))
            plot_confusion_matrix(
                evaluation["confusion_matrix"], data.mapping.names, out / CONFUSION_PLOT,
                title=f"{self.display_name} LoRA classifier",
            )  # fmt: skip
        labels_file = data.mapping.to_file(tokenizer.pad_token_id)
        write_json_atomic(out / LABELS_FILE, labels_file)
        record = dict(
            task="classification", labels=labels_file, class_weights=self.weights,
            label_distribution=data.distribution(), evaluation=evaluation, head_modules=self.heads,
        )  # fmt: skip
        return Finished(metrics=metrics, record=record, drop_metrics=("eval_perplexity",))

    def result_fields(self, out: Path, record: dict) -> dict[str, Any]:
        matrix = out / CONFUSION_PLOT
        return dict(
            labels=self.data.mapping.names,
            evaluation=record.get("evaluation"),
            confusion_matrix=matrix if matrix.exists() else None,
        )


@dataclass(frozen=True)
class _Stats:
    n_truncated: int
    n_dropped: int


__all__ = ["Classification", "ClassificationObjective", "ClassifierResult", "predict_logits"]
