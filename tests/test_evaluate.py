"""Metrics checked against hand-computed values; the confusion-matrix PNG; generation helpers."""

from __future__ import annotations

import math

import pytest

from qlora_lite.training.evaluation import (
    classification_metrics,
    contains_match,
    exact_match,
    format_classification_table,
    format_distribution,
    generation_metrics,
    label_distribution,
    majority_baseline,
    perplexity,
    plot_confusion_matrix,
    side_by_side,
)

NAMES = ["cat", "dog", "fox"]
# true:  cat cat cat dog dog fox
# pred:  cat cat dog dog cat cat
TRUE = [0, 0, 0, 1, 1, 2]
PRED = [0, 0, 1, 1, 0, 0]


def test_classification_metrics_match_hand_computation():
    m = classification_metrics(TRUE, PRED, NAMES)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(3 / 6)
    cat, dog, fox = (m["per_class"][n] for n in NAMES)
    # cat: tp 2, predicted 4, support 3
    assert (cat["precision"], cat["recall"]) == (pytest.approx(2 / 4), pytest.approx(2 / 3))
    assert cat["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))  # 4/7
    # dog: tp 1, predicted 2, support 2
    assert (dog["precision"], dog["recall"], dog["f1"]) == (0.5, 0.5, 0.5)
    # fox: never predicted -> precision 0, recall 0
    assert (fox["precision"], fox["recall"], fox["f1"], fox["support"]) == (0.0, 0.0, 0.0, 1)
    assert m["macro_f1"] == pytest.approx((4 / 7 + 0.5 + 0) / 3)
    assert m["macro_precision"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)


def test_macro_average_skips_classes_absent_from_truth_and_predictions():
    m = classification_metrics([0, 1, 1], [0, 1, 0], NAMES)  # "fox" neither occurs nor is predicted
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert m["per_class"]["fox"]["support"] == 0


def test_tables_baseline_and_distribution():
    table = format_classification_table(classification_metrics(TRUE, PRED, NAMES))
    lines = table.splitlines()
    assert lines[0].split() == ["label", "precision", "recall", "f1", "support"]
    assert lines[1].split() == ["cat", "0.500", "0.667", "0.571", "3"]
    assert lines[-1] == "accuracy 0.500 on 6 examples"
    assert majority_baseline(["a", "a", "b"], ["a", "b", "b", "b"]) == 0.25
    dist = {"train": label_distribution(["a", "b", "a"], ["a", "b", "c"]), "eval": label_distribution(["b"])}
    assert dist["train"] == {"a": 2, "b": 1, "c": 0}
    text = format_distribution(dist)
    assert "a" in text and "66.7%" in text and "100.0%" in text


def test_confusion_matrix_png(tmp_path):
    path = plot_confusion_matrix([[2, 1, 0], [1, 1, 0], [1, 0, 0]], NAMES, tmp_path / "cm.png", title="t")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_generation_helpers():
    preds = ['  {"a": 1}\n', "The answer is Paris.", "no"]
    refs = ['{"a": 1}', "paris", "yes"]
    assert exact_match(preds, refs) == pytest.approx(1 / 3)
    assert exact_match(["Paris"], ["paris"], ignore_case=True) == 1.0
    assert contains_match(preds, refs) == pytest.approx(2 / 3)
    assert contains_match(["PARIS!"], ["paris"], ignore_case=False) == 0.0
    assert perplexity(None) is None and perplexity(0.0) == 1.0 and perplexity(1e6) == math.inf
    assert perplexity(math.log(7)) == pytest.approx(7)
    metrics = generation_metrics(preds, refs, eval_loss=math.log(2))
    assert metrics["perplexity"] == pytest.approx(2) and metrics["exact_match"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_side_by_side():
    text = side_by_side(["Q1", "Q2"], ["b1", "Paris it is"], ["A1", "paris"], ["A1", "Paris"])
    blocks = text.split("\n\n")
    assert blocks[0].splitlines() == [
        "#1 prompt:   Q1",
        "   expected: A1",
        "   before:   [ ] b1",
        "   after:    [=] A1",
    ]
    assert "before:   [~] Paris it is" in blocks[1] and "after:    [~] paris" in blocks[1]
    assert blocks[-1] == "exact match: before 0%, after 50%; contains: before 50%, after 100%"
    plain = side_by_side(["Q"], ["x" * 300], ["y"])
    assert "expected" not in plain and "..." in plain and "[" not in plain
