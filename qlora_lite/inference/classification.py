"""Prediction with a trained classifier run: `classify(run_dir, texts)` or `load_classifier(run_dir)` once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qlora_lite.data import labels as cdata
from qlora_lite.data.labels import ClassifierExample
from qlora_lite.errors import UserError
from qlora_lite.model.loading import base_model_of, load_classification_base, load_tokenizer, read_run_record
from qlora_lite.model.source import resolve_model_source
from qlora_lite.run_files import LABELS_FILE
from qlora_lite.training.record import RUN_RECORD
from qlora_lite.training.task_classifier import predict_logits


class Classifier:
    """A trained run loaded once: `predict(texts)` -> [{"label", "probabilities"}]."""

    def __init__(self, model, tokenizer, labels: tuple, max_length: int | None, device) -> None:
        self.model, self.tokenizer, self.labels = model, tokenizer, tuple(labels)
        self.max_length, self.device = max_length, device

    def probabilities(self, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        """Softmax over the labels, one row per text (rows in the order of `texts`)."""
        examples = [ClassifierExample(ids, 0) for ids in self._encode(texts)]
        logits = predict_logits(self.model, examples, self.tokenizer.pad_token_id, self.device, batch_size)
        return logits.softmax(-1)

    def predict(self, texts: str | list[str], batch_size: int = 16) -> list[dict[str, Any]]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        probs = self.probabilities(texts, batch_size)
        return [
            {
                "label": self.labels[int(row.argmax())],
                "probabilities": {
                    label: round(float(p), 6) for label, p in zip(self.labels, row, strict=True)
                },
            }
            for row in probs
        ]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        for i, text in enumerate(texts, start=1):
            if not isinstance(text, str) or not text.strip():
                raise UserError(
                    f"text {i} is empty or not a string ({text!r}): give non-empty texts to classify"
                )
        kwargs = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        return self.tokenizer(list(texts), **kwargs)["input_ids"]


def load_classifier(
    run_dir: str | Path,
    *,
    model: str | None = None,
    quantization: str | None = None,
    compute_dtype: str | None = None,
    revision: str | None = None,
) -> Classifier:
    """Base model (quantized as in training unless told otherwise) + the run's adapter and head, in eval mode.

    `run_dir` is a run folder or a Hub id (with `revision`)."""
    from peft import PeftModel

    from qlora_lite.hub.push import resolve_adapter

    run_dir = resolve_adapter(run_dir, revision)
    record = read_run_record(run_dir) if run_dir.is_dir() else None
    if record is None:
        raise UserError(f"{run_dir} holds no {RUN_RECORD}: give a finished run folder from train_classifier")
    if record.get("task") != "classification":
        raise UserError(f"{run_dir} is a {record.get('task')} run, not a classifier: use generate() for it")
    mapping = cdata.LabelMapping.from_file(record["labels"])
    plan = record.get("plan", {})
    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(str(run_dir))
    source = resolve_model_source(model or base_model_of(run_dir, record))  # pinned to the recorded commit
    base = load_classification_base(
        source.name, revision=source.revision, quantization=quantization or plan.get("quantization", "nf4"),
        double_quant=plan.get("double_quant", True), compute_dtype=compute_dtype or plan.get("compute_dtype", "fp32"),
        accelerator=accelerator, attn_implementation=plan.get("attn_implementation", "sdpa"),
        **mapping.config_kwargs(tokenizer.pad_token_id),
    )  # fmt: skip
    peft_model = PeftModel.from_pretrained(base, str(run_dir)).eval()
    device = next(peft_model.parameters()).device
    return Classifier(peft_model, tokenizer, mapping.names, plan.get("max_seq_length"), device)


def classify(
    adapter_dir: str | Path, texts: str | list[str], *, batch_size: int = 16, **load_kwargs: Any
) -> list[dict]:
    """Labels and probabilities for `texts` from a trained classifier run: [{"label", "probabilities"}]."""
    return load_classifier(adapter_dir, **load_kwargs).predict(texts, batch_size=batch_size)


def read_labels(run_dir: str | Path) -> dict[str, Any]:
    """The run's label mapping: {"num_labels", "id2label", "label2id", "pad_token_id", "names"}."""
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: give a run folder written by train_classifier")
    return json.loads(path.read_text())


__all__ = ["Classifier", "classify", "load_classifier", "read_labels"]
