"""Numbers about a model's predictions: confusion matrix, per-class precision and recall, calibration.

Pure functions of tensors (predictions, targets, probabilities on the CPU), so the views, the
report, the notebook and the tests all compute them the same way. Nothing here draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ECE_BINS = 15  # equal-width confidence bins, the usual choice since Guo et al. 2017


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[true, predicted] counts as int64: row i holds where the images of class i went."""
    index = targets.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_scores(matrix: torch.Tensor) -> dict[str, list[float]]:
    """Accuracy (= recall), precision and support per class from a confusion matrix.

    A class never predicted has precision 0 (not NaN), so the numbers stay valid JSON.
    """
    hits = matrix.diag().double()
    actual = matrix.sum(dim=1).double()
    predicted = matrix.sum(dim=0).double()
    recall = hits / actual.clamp(min=1)
    return {"precision": (hits / predicted.clamp(min=1)).tolist(), "recall": recall.tolist(),
            "accuracy": recall.tolist(), "support": matrix.sum(dim=1).tolist()}


@dataclass
class Calibration:
    """How far confidence is from accuracy. Bins are equal-width in confidence over [0, 1]."""

    ece: float  # expected calibration error: sum over bins of (bin share of images) * |accuracy - confidence|
    edges: list[float]  # bins + 1 edges
    accuracy: list[float | None]  # per bin; None where the bin is empty
    confidence: list[float | None]  # mean confidence per bin
    count: list[int]


def calibration(probabilities: torch.Tensor, targets: torch.Tensor, bins: int = ECE_BINS) -> Calibration:
    """ECE and the reliability-diagram bins of the top-class confidence."""
    confidence, predictions = probabilities.double().max(dim=1)
    correct = (predictions == targets).double()
    # bin b holds confidences in (edge_b, edge_b+1]; a confidence of exactly 0 goes to the first bin
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(which, minlength=bins)
    conf_sum = torch.bincount(which, weights=confidence, minlength=bins)
    acc_sum = torch.bincount(which, weights=correct, minlength=bins)
    n = max(len(targets), 1)
    ece = float((acc_sum - conf_sum).abs().sum() / n)  # = sum_b (n_b / n) * |acc_b - conf_b|
    per_bin = lambda sums: [float(s / c) if c else None for s, c in zip(sums, count)]  # noqa: E731
    return Calibration(ece, torch.linspace(0, 1, bins + 1).tolist(), per_bin(acc_sum), per_bin(conf_sum),
                       count.tolist())


def worst_mistakes(probabilities: torch.Tensor, targets: torch.Tensor, k: int = 16) -> list[int]:
    """Indices of the k wrong predictions made with the highest confidence, most confident first."""
    confidence, predictions = probabilities.max(dim=1)
    wrong = torch.nonzero(predictions != targets).flatten()
    order = confidence[wrong].argsort(descending=True, stable=True)
    return wrong[order[:k]].tolist()


def summarize(predictions: torch.Tensor, targets: torch.Tensor, probabilities: torch.Tensor,
              classes: list[str], mistakes: int = 16) -> dict:
    """Everything `eval --out` writes to eval.json, as JSON-ready values."""
    matrix = confusion_matrix(predictions, targets, len(classes))
    scores = per_class_scores(matrix)
    calib = calibration(probabilities, targets)
    worst = worst_mistakes(probabilities, targets, mistakes)
    return {
        "n": len(targets), "correct": int(matrix.diag().sum()),
        "accuracy": float(matrix.diag().sum()) / max(len(targets), 1),
        "per_class": {name: {key: scores[key][i] for key in ("accuracy", "precision", "recall", "support")}
                      for i, name in enumerate(classes)},
        "confusion_matrix": matrix.tolist(),  # [true][predicted]
        "ece": calib.ece, "calibration_bins": {"edges": calib.edges, "accuracy": calib.accuracy,
                                               "confidence": calib.confidence, "count": calib.count},
        "worst_mistakes": [{"index": i, "true": classes[int(targets[i])], "predicted": classes[int(predictions[i])],
                            "probability": float(probabilities[i].max())} for i in worst],
    }
