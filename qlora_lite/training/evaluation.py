"""Evaluation people can read: classification metrics, a confusion-matrix PNG, tables; generation metrics.

Classification: `classification_metrics(y_true, y_pred, names)` returns accuracy, macro-F1 and per-class
precision/recall/F1 with the confusion matrix (rows = true label, columns = predicted label);
`format_classification_table` prints it and `plot_confusion_matrix` draws it.

Generation: `exact_match`, `contains_match`, `perplexity` and `side_by_side` (sample answers before and
after training next to the expected ones), usable from the causal demo and from notebooks.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------- classification


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], label_names: Sequence[Any]
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class scores and the confusion matrix.

    `y_true`/`y_pred` are label ids (indices into `label_names`). A class's precision is 0 when it is never
    predicted, its recall 0 when it never occurs. Macro averages run over the classes that occur in
    `y_true` or `y_pred` (as scikit-learn does by default), so a class absent from a small eval set and
    never predicted does not count as a zero.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    k = len(label_names)
    matrix = [[0] * k for _ in range(k)]
    for t, p in zip(y_true, y_pred, strict=True):
        matrix[t][p] += 1
    per_class: dict[str, dict[str, float | int]] = {}
    present = []
    for i, name in enumerate(label_names):
        tp = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[str(name)] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
            "predicted": predicted,
        }
        if support or predicted:
            present.append(str(name))
    n = len(y_true)

    def macro(key: str) -> float:
        return sum(per_class[c][key] for c in present) / len(present) if present else 0.0

    return {
        "accuracy": sum(matrix[i][i] for i in range(k)) / n if n else 0.0,
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),
        "macro_f1": macro("f1"),
        "examples": n,
        "labels": [str(name) for name in label_names],
        "per_class": per_class,
        "confusion_matrix": matrix,
    }


def majority_baseline(train_labels: Sequence[Hashable], eval_labels: Sequence[Hashable]) -> float:
    """Accuracy on `eval_labels` of always answering the most frequent training label."""
    if not eval_labels or not train_labels:
        return 0.0
    majority = Counter(train_labels).most_common(1)[0][0]
    return sum(1 for y in eval_labels if y == majority) / len(eval_labels)


def label_distribution(labels: Sequence[Hashable], order: Sequence[Hashable] | None = None) -> dict[str, int]:
    """{label: count}, in `order` when given (labels with no examples show 0), else most common first."""
    counts = Counter(labels)
    keys = list(order) if order is not None else [k for k, _ in counts.most_common()]
    return {str(k): counts.get(k, 0) for k in keys}


def format_distribution(distributions: dict[str, dict[str, int]]) -> str:
    """A table of label counts and shares, one column per split (e.g. {"train": {...}, "eval": {...}})."""
    splits = list(distributions)
    labels = list(dict.fromkeys(k for d in distributions.values() for k in d))
    totals = {s: sum(distributions[s].values()) for s in splits}
    width = max([len("label"), *(len(label) for label in labels)])
    header = f"{'label':<{width}}" + "".join(f"  {s:>14}" for s in splits)
    lines = [header]
    for label in labels:
        cells = ""
        for s in splits:
            count = distributions[s].get(label, 0)
            share = 100 * count / totals[s] if totals[s] else 0.0
            cells += f"  {count:>6} ({share:4.1f}%)"
        lines.append(f"{label:<{width}}{cells}")
    return "\n".join(lines)


def format_classification_table(metrics: dict[str, Any]) -> str:
    """Per-class precision/recall/F1/support, then accuracy and the macro averages, as aligned text."""
    names = list(metrics["per_class"])
    width = max([len("macro avg"), *(len(n) for n in names)])
    lines = [f"{'label':<{width}}  precision  recall     f1  support"]
    for name in names:
        row = metrics["per_class"][name]
        lines.append(
            f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}"
        )
    lines.append(
        f"{'macro avg':<{width}}  {metrics['macro_precision']:9.3f}  {metrics['macro_recall']:6.3f}  "
        f"{metrics['macro_f1']:5.3f}  {metrics['examples']:7d}"
    )
    lines.append(f"accuracy {metrics['accuracy']:.3f} on {metrics['examples']} examples")
    return "\n".join(lines)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], label_names: Sequence[Any], path: str | Path, title: str = ""
) -> Path:
    """Draw the confusion matrix (rows: true, columns: predicted) with counts in the cells, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    k = len(label_names)
    size = max(4.0, 0.6 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=100)
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    names = [str(n) for n in label_names]
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = max((max(row) for row in matrix), default=0)
    for i in range(k):
        for j in range(k):
            value = matrix[i][j]
            ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- generation


def _normalize(text: str, ignore_case: bool) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text.casefold() if ignore_case else text


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def exact_match(predictions: Sequence[str], references: Sequence[str], *, ignore_case: bool = False) -> float:
    """Fraction of predictions equal to their reference after trimming and collapsing whitespace."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(
        _normalize(p, ignore_case) == _normalize(r, ignore_case)
        for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def contains_match(
    predictions: Sequence[str], references: Sequence[str], *, ignore_case: bool = True
) -> float:
    """Fraction of predictions that contain their reference (whitespace-normalised; case-blind by default)."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(
        _normalize(r, ignore_case) in _normalize(p, ignore_case)
        for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def perplexity(eval_loss: float | None) -> float | None:
    """exp(mean token cross-entropy); None without a loss, inf when it overflows."""
    if eval_loss is None:
        return None
    try:
        return math.exp(eval_loss)
    except OverflowError:
        return math.inf


def _clip(text: str, width: int) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= width else text[: width - 3] + "..."


def side_by_side(
    prompts: Sequence[str],
    before: Sequence[str],
    after: Sequence[str],
    expected: Sequence[str] | None = None,
    *,
    width: int = 100,
) -> str:
    """Sample generations before and after training, one block per prompt, next to the expected answer.

    With `expected`, each answer is marked `[=]` when it matches exactly (whitespace-normalised),
    `[~]` when it contains the expected answer, and `[ ]` otherwise; a summary line closes the text.
    """
    n = len(prompts)
    if len(before) != n or len(after) != n or (expected is not None and len(expected) != n):
        raise ValueError("prompts, before, after (and expected) must have the same length")

    def mark(answer: str, reference: str) -> str:
        if exact_match([answer], [reference]):
            return "[=] "
        return "[~] " if contains_match([answer], [reference]) else "[ ] "

    blocks = []
    for i in range(n):
        lines = [f"#{i + 1} prompt:   {_clip(prompts[i], width)}"]
        ref = expected[i] if expected is not None else None
        if ref is not None:
            lines.append(f"   expected: {_clip(ref, width)}")
        for name, answer in (("before", before[i]), ("after", after[i])):
            tag = mark(answer, ref) if ref is not None else ""
            lines.append(f"   {name + ':':<9} {tag}{_clip(answer, width)}")
        blocks.append("\n".join(lines))
    if expected is not None and n:
        blocks.append(
            f"exact match: before {exact_match(before, expected):.0%}, after {exact_match(after, expected):.0%}; "
            f"contains: before {contains_match(before, expected):.0%}, after {contains_match(after, expected):.0%}"
        )
    return "\n\n".join(blocks)


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str], eval_loss: float | None = None
) -> dict[str, float | None]:
    """The generation-task numbers for a run record: exact/contains match, eval loss and perplexity."""
    return {
        "exact_match": exact_match(predictions, references),
        "contains_match": contains_match(predictions, references),
        "eval_loss": eval_loss,
        "perplexity": perplexity(eval_loss),
    }
