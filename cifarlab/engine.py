"""The step and the loops: `train_step` is the one place a training step happens; `train_one_epoch`,
`evaluate`, and the notebook's `train`/`test` generators and `fit` are thin loops around it.

Per-batch values stay on the device as tensors: the loops never call `.item()` per batch, so a GPU
is never made to wait for the host. Sums are read once per epoch.

The loss is `cross_entropy`, which applies log-softmax itself. The notebook's CNN already ends in
log-softmax; log-softmax of log-probabilities returns them unchanged, so one loss serves models that
end in log-softmax (NLL, as the notebook) and models that return logits.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.device import autocast
from cifarlab.ema import Lookahead, WeightEMA
from cifarlab.records import EpochRecord, EpochSums, EvalResult, History


def mixed_cross_entropy(output: torch.Tensor, target: torch.Tensor, partner: torch.Tensor | None = None,
                        lam: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against `target`, or for a mixup/cutmix batch the `lam`-weighted sum of the losses
    against both label sets (the same as cross-entropy against the mixed soft labels)."""
    loss = F.cross_entropy(output, target, label_smoothing=label_smoothing)
    if partner is None:
        return loss
    return lam * loss + (1 - lam) * F.cross_entropy(output, partner, label_smoothing=label_smoothing)


@dataclass
class Step:
    """Everything one training step uses, built once per run (`build.build_run`) or per notebook call."""

    model: nn.Module  # what trains: the model, or the DDP wrapper around it
    optimizer: torch.optim.Optimizer
    device: torch.device
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # stepped after every batch
    ema: WeightEMA | None = None  # updated after every step
    lookahead: Lookahead | None = None  # every few steps, pulls the weights towards their slow average
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: fp32
    label_smoothing: float = 0.0
    clip_grad: float = 0.0  # max gradient norm; 0: no clipping
    scaler: torch.amp.GradScaler | None = None  # made from amp_dtype when not given

    def __post_init__(self) -> None:
        if self.scaler is None:
            # fp16's narrow exponent flushes small gradients to zero: scale the loss up before backward
            # and the gradients down before the step (skipping steps whose gradients overflowed).
            # Disabled, the scaler passes everything through, so there is one code path.
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


def train_step(step: Step, batch: Sequence, sums: EpochSums | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on `batch` = (images, labels[, partner labels, weight]); returns the
    batch's loss and accuracy as detached 0-dim tensors and adds them to `sums` (no host sync).

    A mixup/cutmix batch carries partners; accuracy is then against `labels`, the majority of each image."""
    images, labels, *mix = batch
    images, labels = images.to(step.device, non_blocking=True), labels.to(step.device, non_blocking=True)
    with autocast(step.device, step.amp_dtype):
        output = step.model(images)
        loss = mixed_cross_entropy(output, labels, *mix, label_smoothing=step.label_smoothing)
    step.optimizer.zero_grad(set_to_none=True)
    step.scaler.scale(loss).backward()
    if step.clip_grad > 0:
        step.scaler.unscale_(step.optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(step.model.parameters(), step.clip_grad)
    step.scaler.step(step.optimizer)
    step.scaler.update()
    if step.scheduler is not None:
        step.scheduler.step()
    if step.lookahead is not None:
        step.lookahead.update(step.model)
    if step.ema is not None:
        step.ema.update(step.model)
    loss, accuracy = loss.detach().float(), (output.detach().argmax(dim=1) == labels).float().mean()
    if sums is not None:
        sums.add(loss, accuracy)
    return loss, accuracy


def train_one_epoch(step: Step, loader: Iterable, sums: EpochSums | None = None) -> EpochSums:
    """One pass over `loader`; returns the epoch's sums (`sums` continues an epoch resumed part-way)."""
    sums = sums if sums is not None else EpochSums.zeros(step.device, step.optimizer.param_groups[0]["lr"])
    step.model.train()
    for batch in loader:
        train_step(step, batch, sums)
    return sums


def _shift(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate a batch by (dy, dx) pixels with reflected edges, keeping its size."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    return padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]


def _view_probs(model: nn.Module, images: torch.Tensor, tta: int, plain: torch.Tensor | None) -> torch.Tensor:
    """Probabilities averaged over the test-time views of `images` (the image and its mirror; at tta 2
    both also shifted one pixel up-left and down-right, the unshifted pair weighing half, as airbench)."""
    views = [images, images.flip(-1)]
    weights = [1.0] * len(views)
    if tta >= 2:
        pair = views[:]
        views += [_shift(v, d, d) for d in (1, -1) for v in pair]
        weights = [0.25, 0.25] + [0.125] * 4
    probs = sum(w * (plain if i == 0 and plain is not None else model(v).float().softmax(dim=1))
                for i, (w, v) in enumerate(zip(weights, views)))
    return probs / sum(weights)


def tta_log_probs(model: nn.Module, images: torch.Tensor, tta: int = 0, plain: torch.Tensor | None = None,
                  share: float = 1.0) -> torch.Tensor:
    """Log-probabilities averaged over test-time views (`_view_probs`); tta 0: the image alone.

    `plain`: the image alone's probabilities, already computed (the last epoch's evaluation), not computed
    again. `share` < 1: only that share of the batch, the least confident (lowest top probability in
    the plain view), gets the other views; the rest keep the plain prediction, which the other views
    would rarely overturn, for a fraction of the passes."""
    if tta == 0:
        return model(images).float().log_softmax(dim=1)
    if share >= 1:
        return _view_probs(model, images, tta, plain).clamp_min(1e-12).log()
    plain = plain if plain is not None else model(images).float().softmax(dim=1)
    doubtful = plain.amax(dim=1).topk(math.ceil(share * len(images)), largest=False).indices
    probs = plain.clone()
    probs[doubtful] = _view_probs(model, images[doubtful], tta, plain[doubtful])
    return probs.clamp_min(1e-12).log()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             amp_dtype: torch.dtype | None = None, tta: int = 0, plain: EvalResult | None = None,
             tta_share: float = 1.0) -> EvalResult:
    """Loss, accuracy and predictions of `model` over `loader` (see `tta_log_probs` for `tta` and
    `tta_share`).

    `plain`: this model's evaluation without test-time augmentation over the same loader, whose
    probabilities stand in for the unaugmented view. One host sync, at the end.
    """
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    outputs, targets, seen = [], [], 0
    for data, target in loader:
        data, target = data.to(device, non_blocking=True), target.to(device, non_blocking=True)
        known = plain.probabilities[seen:seen + len(target)].to(device) if plain is not None and tta else None
        seen += len(target)
        with autocast(device, amp_dtype):
            output = tta_log_probs(model, data, tta, known, tta_share)
        loss_sum += F.nll_loss(output, target, reduction="sum")
        outputs.append(output)
        targets.append(target)
    log_probs, targets_t = torch.cat(outputs).cpu(), torch.cat(targets).cpu()
    predictions = log_probs.argmax(dim=1)
    n = len(targets_t)
    return EvalResult(loss=loss_sum.item() / max(n, 1), accuracy=(predictions == targets_t).double().mean().item(),
                      n=n, predictions=predictions, targets=targets_t, probabilities=log_probs.exp())


# --- the notebook's API, over the same step -------------------------------------------------------

def _logged_steps(step: Step, loader: Iterable, epoch: int,
                  log_interval: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    step.model.train()
    for batch_idx, batch in enumerate(loader):
        loss, accuracy = train_step(step, batch)
        if log_interval and batch_idx % log_interval == 0:  # the print reads the values: a sync, as asked
            print(f"Train Epoch: {epoch} [{batch_idx}/{len(loader)}]\tLoss: {loss.item():.6f}"
                  f"\tAccuracy: {accuracy.item():.2f}")
        yield loss, accuracy


def train(model: nn.Module, device: torch.device, train_loader: Iterable, optimizer: torch.optim.Optimizer,
          epoch: int = 0, log_interval: int | None = None, **options) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The notebook's training loop: one epoch, yielding (loss, accuracy) of each batch as detached
    0-dim tensors. `options` are `Step`'s fields (scheduler, ema, amp_dtype, label_smoothing, clip_grad);
    `log_interval` prints every N batches as the notebook did."""
    yield from _logged_steps(Step(model, optimizer, device, **options), train_loader, epoch, log_interval)


def test(model: nn.Module, device: torch.device, test_loader: Iterable,
         amp_dtype: torch.dtype | None = None) -> Iterator[tuple[float, float]]:
    """The notebook's test loop: prints a summary and yields one (average loss, accuracy)."""
    result = evaluate(model, test_loader, device, amp_dtype)
    print(f"\nTest set: Average loss: {result.loss:.4f}, Accuracy: {round(result.accuracy * result.n)}/{result.n} "
          f"({100 * result.accuracy:.0f}%)\n")
    yield result.loss, result.accuracy


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, n_epochs: int, device: torch.device,
        train_loader: Iterable, test_loader: Iterable | None, log_interval: int | None = None,
        **options) -> History:
    """The notebook's `fit`: train for `n_epochs`, print each epoch, draw the notebook's curves
    (training loss and accuracy per batch, validation per epoch). `options` are `Step`'s fields; with
    `ema=WeightEMA(model, decay)` the average is updated every step and is what validation evaluates."""
    step = Step(model, optimizer, device, **options)
    history, per_batch = History(), []
    for epoch in range(1, n_epochs + 1):
        started, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        batches = torch.stack([torch.stack(pair) for pair in _logged_steps(step, train_loader, epoch, log_interval)])
        per_batch.append(batches)
        train_loss, train_acc = batches.mean(dim=0).tolist()
        val = (evaluate(step.ema.module if step.ema is not None else model, test_loader, device, step.amp_dtype)
               if test_loader is not None else None)
        record = EpochRecord(epoch, train_loss, train_acc, val.loss if val else None, val.accuracy if val else None,
                             lr, time.perf_counter() - started)
        history.records.append(record)
        shown = f", val loss {record.val_loss:.4f}, val acc {record.val_acc:.4f}" if val is not None else ""
        print(f"epoch {epoch}/{n_epochs}: train loss {train_loss:.4f}, train acc {train_acc:.4f}{shown} "
              f"({record.seconds:.1f} s)")
    history.batch_loss, history.batch_acc = torch.cat(per_batch).T.tolist() if per_batch else ([], [])
    from cifarlab.plots import plot_history

    plot_history(history, n_epochs)
    return history
