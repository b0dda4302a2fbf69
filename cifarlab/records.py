"""The record types the loops produce and the rest of the package reads: an epoch's running sums,
an epoch's row, a run's history, and one evaluation. Plain dataclasses, no behaviour beyond arithmetic,
so every module can import them without importing the loops."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EpochSums:
    """An epoch's running sums, on the device: the step adds to them without a host sync, and a
    mid-epoch checkpoint keeps them to finish the epoch's means exactly. `bad_batch` is the first batch
    (1-based) whose loss was NaN or inf, 0 while none was; it is read only where the trainer checkpoints."""

    loss: torch.Tensor
    acc: torch.Tensor
    bad_batch: torch.Tensor
    batches: int = 0
    lr: float = 0.0  # the learning rate when the epoch began (the epoch's metrics row reports it)

    @classmethod
    def zeros(cls, device: torch.device, lr: float = 0.0) -> "EpochSums":
        return cls(torch.zeros((), device=device), torch.zeros((), device=device),
                   torch.zeros((), device=device, dtype=torch.long), 0, lr)

    def add(self, loss: torch.Tensor, accuracy: torch.Tensor) -> None:
        self.loss += loss
        self.acc += accuracy
        self.batches += 1
        self.bad_batch.masked_fill_((self.bad_batch == 0) & ~torch.isfinite(loss), self.batches)

    def means(self) -> tuple[float, float]:
        """Mean loss and accuracy over the epoch's batches: the one host read of an epoch."""
        n = max(self.batches, 1)
        return self.loss.item() / n, self.acc.item() / n


@dataclass
class EpochRecord:
    """One row of metrics.csv."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    lr: float
    seconds: float  # wall time of this epoch's training and evaluation


@dataclass
class History:
    records: list[EpochRecord] = field(default_factory=list)
    # per-batch training values, where a loop kept them (the notebook's `fit` does: its curves show them)
    batch_loss: list[float] = field(default_factory=list)
    batch_acc: list[float] = field(default_factory=list)

    def column(self, name: str) -> list[float]:
        return [getattr(r, name) for r in self.records]


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    n: int
    predictions: torch.Tensor  # predicted label per image, on the CPU
    targets: torch.Tensor
    probabilities: torch.Tensor  # softmax of the outputs, [n, classes], on the CPU

    def per_class_accuracy(self, num_classes: int) -> list[float]:
        correct = torch.bincount(self.targets[self.predictions == self.targets], minlength=num_classes)
        total = torch.bincount(self.targets, minlength=num_classes).clamp(min=1)
        return (correct.double() / total).tolist()
