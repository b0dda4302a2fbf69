"""The loops: the notebook's `train`/`test` generators, `train_one_epoch`, `evaluate`, and `fit`.

Per-batch values stay on the device as tensors: the loops never call `.item()` per batch, so a GPU
is never made to wait for the host. Sums are read once per epoch.

The loss is `cross_entropy`, which applies log-softmax itself. The notebook's CNN already ends in
log-softmax; log-softmax of log-probabilities returns them unchanged, so one loss serves models that
end in log-softmax (NLL, as the notebook) and models that return logits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.device import autocast


def mixed_cross_entropy(output: torch.Tensor, target: torch.Tensor, partner: torch.Tensor | None = None,
                        lam: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against `target`, or for a mixup/cutmix batch the `lam`-weighted sum of the losses
    against both label sets (the same as cross-entropy against the mixed soft labels)."""
    loss = F.cross_entropy(output, target, label_smoothing=label_smoothing)
    if partner is None:
        return loss
    return lam * loss + (1 - lam) * F.cross_entropy(output, partner, label_smoothing=label_smoothing)


def train(model: nn.Module, device: torch.device, train_loader: Iterable, optimizer: torch.optim.Optimizer,
          epoch: int = 0, log_interval: int | None = None, *, scheduler=None, amp_dtype: torch.dtype | None = None,
          label_smoothing: float = 0.0, clip_grad: float = 0.0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Train one epoch, yielding (loss, accuracy) of each batch as detached 0-dim tensors.

    `log_interval` prints every N batches as the notebook did (that print reads the values, a sync).
    A batch may carry mixup/cutmix partners, (images, labels, partner labels, weight); accuracy is then
    against `labels`, the majority of each mixed image. `clip_grad` > 0 clips the gradient norm to it.
    """
    model.train()
    for batch_idx, (data, target, *mix) in enumerate(train_loader):
        data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(data)
            loss = mixed_cross_entropy(output, target, *mix, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss = loss.detach().float()
        accuracy = (output.detach().argmax(dim=1) == target).float().mean()
        if log_interval and batch_idx % log_interval == 0:
            print(f"Train Epoch: {epoch} [{batch_idx}/{len(train_loader)}]\tLoss: {loss.item():.6f}"
                  f"\tAccuracy: {accuracy.item():.2f}")
        yield loss, accuracy


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


def _shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate a batch by (dy, dx) pixels with reflected edges, keeping its size."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    return padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]


def tta_log_probs(model: nn.Module, images: torch.Tensor, tta: int = 0) -> torch.Tensor:
    """Log-probabilities averaged over test-time views, as airbench does it.

    tta 0: the image alone. 1: the image and its mirror. 2: those two plus both shifted one pixel
    up-left and down-right (6 views; the unshifted pair weighs half, as in airbench).
    """
    if tta == 0:
        return model(images).float().log_softmax(dim=1)
    views = [images, images.flip(-1)]
    weights = [1.0] * len(views)
    if tta >= 2:
        pair = views[:]
        views += [_shift(v, d, d) for d in (1, -1) for v in pair]
        weights = [0.25, 0.25] + [0.125] * 4
    probs = sum(w * model(v).float().softmax(dim=1) for w, v in zip(weights, views)) / sum(weights)
    return probs.clamp_min(1e-12).log()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             amp_dtype: torch.dtype | None = None, tta: int = 0) -> EvalResult:
    """Loss, accuracy and predictions of `model` over `loader` (see `tta_log_probs` for `tta`).

    One host sync, at the end.
    """
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    outputs, targets = [], []
    for data, target in loader:
        data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = tta_log_probs(model, data, tta)
        loss_sum += F.nll_loss(output, target, reduction="sum")
        outputs.append(output)
        targets.append(target)
    log_probs, targets_t = torch.cat(outputs).cpu(), torch.cat(targets).cpu()
    predictions = log_probs.argmax(dim=1)
    n = len(targets_t)
    return EvalResult(loss=loss_sum.item() / max(n, 1), accuracy=(predictions == targets_t).double().mean().item(),
                      n=n, predictions=predictions, targets=targets_t, probabilities=log_probs.exp())


def test(model: nn.Module, device: torch.device, test_loader: Iterable,
         amp_dtype: torch.dtype | None = None) -> Iterator[tuple[float, float]]:
    """The notebook's test loop: prints a summary and yields one (average loss, accuracy)."""
    result = evaluate(model, test_loader, device, amp_dtype)
    print(f"\nTest set: Average loss: {result.loss:.4f}, Accuracy: {round(result.accuracy * result.n)}/{result.n} "
          f"({100 * result.accuracy:.0f}%)\n")
    yield result.loss, result.accuracy


@dataclass
class EpochSums:
    """An epoch's running sums, on the device: what a mid-epoch checkpoint keeps to finish the epoch's
    means exactly. `bad_batch` is the first batch (1-based) whose loss was NaN or inf, 0 while none
    was; it is updated on the device (no sync) and read only where the trainer checkpoints."""

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


def train_one_epoch(model: nn.Module, device: torch.device, loader: Iterable, optimizer: torch.optim.Optimizer,
                    *, scheduler=None, amp_dtype: torch.dtype | None = None, label_smoothing: float = 0.0,
                    clip_grad: float = 0.0,
                    log_interval: int | None = None, on_batch=None, sums: EpochSums | None = None,
                    on_step=None) -> tuple[float, float]:
    """Mean training loss and accuracy over one epoch; sums stay on the device until the end.

    `on_batch(batch_idx, loss)` is called after each step (the progress bar uses it), then
    `on_step(sums)` (the trainer checkpoints from it). `sums` continues an epoch resumed part-way;
    it is updated in place.
    """
    sums = sums if sums is not None else EpochSums.zeros(device)
    for loss, accuracy in train(model, device, loader, optimizer, log_interval=log_interval, scheduler=scheduler,
                                amp_dtype=amp_dtype, label_smoothing=label_smoothing, clip_grad=clip_grad):
        sums.add(loss, accuracy)
        if on_batch is not None:
            on_batch(sums.batches, loss)
        if on_step is not None:
            on_step(sums)
    return sums.loss.item() / max(sums.batches, 1), sums.acc.item() / max(sums.batches, 1)


@dataclass
class EpochRecord:
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

    def column(self, name: str) -> list[float]:
        return [getattr(r, name) for r in self.records]


def fit_epochs(model: nn.Module, optimizer: torch.optim.Optimizer, n_epochs: int, device: torch.device,
               train_loader: Iterable, val_loader: Iterable | None, *, scheduler=None,
               amp_dtype: torch.dtype | None = None, label_smoothing: float = 0.0, clip_grad: float = 0.0,
               eval_model: nn.Module | None = None, first_epoch: int = 1,
               log_interval: int | None = None, on_batch=None, on_step=None,
               resume_sums: EpochSums | None = None, on_eval=None) -> Iterator[EpochRecord]:
    """Train and validate epoch by epoch, yielding one record per epoch (the caller logs and saves).

    `on_step(epoch, sums)` is called after every step; `resume_sums` continues `first_epoch` part-way.
    `eval_model` is what validation evaluates (default `model`): the weight EMA, or the model a DDP
    wrapper holds.
    """
    for epoch in range(first_epoch, n_epochs + 1):
        start = time.perf_counter()
        sums = (resume_sums if resume_sums is not None and epoch == first_epoch
                else EpochSums.zeros(device, optimizer.param_groups[0]["lr"]))
        lr = sums.lr
        step_hook = (lambda s, e=epoch: on_step(e, s)) if on_step is not None else None
        train_loss, train_acc = train_one_epoch(model, device, train_loader, optimizer, scheduler=scheduler,
                                                amp_dtype=amp_dtype, label_smoothing=label_smoothing,
                                                clip_grad=clip_grad,
                                                log_interval=log_interval, on_batch=on_batch, sums=sums,
                                                on_step=step_hook)
        val = (evaluate(eval_model if eval_model is not None else model, val_loader, device, amp_dtype)
               if val_loader is not None else None)
        if val is not None and on_eval is not None:
            on_eval(val)  # the full EvalResult (predictions, probabilities): the trainer's end-of-run views
        yield EpochRecord(epoch, train_loss, train_acc, val.loss if val else None, val.accuracy if val else None,
                          lr, time.perf_counter() - start)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, n_epochs: int, device: torch.device,
        train_loader: Iterable, test_loader: Iterable | None, log_interval: int | None = None, *,
        plot: bool = True, **kwargs) -> History:
    """The notebook's `fit`: train for `n_epochs`, print each epoch, draw loss and accuracy curves."""
    history = History()
    for record in fit_epochs(model, optimizer, n_epochs, device, train_loader, test_loader,
                             log_interval=log_interval, **kwargs):
        history.records.append(record)
        val = f", val loss {record.val_loss:.4f}, val acc {record.val_acc:.4f}" if record.val_acc is not None else ""
        print(f"epoch {record.epoch}/{n_epochs}: train loss {record.train_loss:.4f}, "
              f"train acc {record.train_acc:.4f}{val} ({record.seconds:.1f} s)")
    if plot:
        from cifarlab.plots import plot_history

        plot_history(history, n_epochs)
    return history
