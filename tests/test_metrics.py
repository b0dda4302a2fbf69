"""metrics.py against numbers worked out by hand: confusion matrix, precision/recall, ECE, worst mistakes."""
from __future__ import annotations

import pytest
import torch

from cifarlab.metrics import calibration, confusion_matrix, per_class_scores, summarize, worst_mistakes


def test_confusion_matrix_rows_are_true_classes() -> None:
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    predictions = torch.tensor([0, 0, 1, 1, 2, 2])
    matrix = confusion_matrix(predictions, targets, 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    scores = per_class_scores(matrix)
    assert scores["recall"] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert scores["precision"] == pytest.approx([1.0, 1 / 2, 1 / 2])
    assert scores["support"] == [3, 2, 1]


def test_a_class_never_predicted_has_precision_zero_not_nan() -> None:
    scores = per_class_scores(confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 1]), 3))
    assert scores["precision"] == [0.5, 0.0, 0.0] and scores["recall"] == [1.0, 0.0, 0.0]


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy() -> None:
    # two images at confidence 0.85 (one right), two at 0.55 (both right); 10 bins
    probabilities = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.55, 0.45], [0.45, 0.55]])
    targets = torch.tensor([0, 1, 0, 1])
    calib = calibration(probabilities, targets, bins=10)
    # bin (0.8, 0.9]: accuracy 0.5, confidence 0.85; bin (0.5, 0.6]: accuracy 1, confidence 0.55
    assert calib.ece == pytest.approx(0.5 * 0.35 + 0.5 * 0.45)
    assert calib.count[8] == 2 and calib.count[5] == 2 and sum(calib.count) == 4
    assert calib.accuracy[8] == pytest.approx(0.5) and calib.confidence[5] == pytest.approx(0.55)
    assert calib.accuracy[0] is None  # empty bins stay empty, not 0


def test_a_perfectly_calibrated_model_has_zero_ece() -> None:
    probabilities = torch.tensor([[1.0, 0.0]] * 5)
    assert calibration(probabilities, torch.zeros(5, dtype=torch.long)).ece == pytest.approx(0.0)


def test_worst_mistakes_are_the_most_confident_wrong_predictions() -> None:
    probabilities = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.99, 0.01]])
    targets = torch.tensor([0, 0, 1, 0, 0])  # wrong: 1 (0.8), 2 (0.6), 3 (0.7)
    assert worst_mistakes(probabilities, targets, k=2) == [1, 3]
    assert worst_mistakes(probabilities, targets) == [1, 3, 2]


def test_summarize_is_json_ready_and_consistent() -> None:
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2]])
    targets = torch.tensor([0, 1, 2])
    summary = summarize(probabilities.argmax(1), targets, probabilities, ["a", "b", "c"])
    assert summary["accuracy"] == pytest.approx(2 / 3) and summary["correct"] == 2 and summary["n"] == 3
    assert summary["per_class"]["c"] == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "support": 1}
    assert summary["worst_mistakes"] == [{"index": 2, "true": "c", "predicted": "a", "probability": 0.5}]
