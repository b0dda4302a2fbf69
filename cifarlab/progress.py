"""Progress output: a live bar per epoch in a terminal, one plain line per epoch in a log file.

The bar is redrawn after every batch but reads the loss value (a host sync) at most once a second.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

import torch

from cifarlab.engine import EpochRecord


def format_epoch(record: EpochRecord, n_epochs: int, split: str | None) -> str:
    val = (f"  {split} loss {record.val_loss:.4f}  {split} acc {100 * record.val_acc:.2f}%"
           if record.val_acc is not None else "")
    return (f"epoch {record.epoch:>{len(str(n_epochs))}}/{n_epochs}  train loss {record.train_loss:.4f}  "
            f"train acc {100 * record.train_acc:.2f}%{val}  lr {record.lr:.3g}  {record.seconds:.1f}s")


class EpochProgress:
    def __init__(self, n_epochs: int, steps_per_epoch: int, split: str | None, out: TextIO | None = None,
                 bar_stream: TextIO | None = None) -> None:
        self.n_epochs, self.steps, self.split = n_epochs, steps_per_epoch, split
        self.out = out or sys.stdout  # looked up now, not at import: tests and notebooks swap the streams
        self.bar_stream = bar_stream or sys.stderr
        self.live = self.bar_stream.isatty()
        self.bar = None
        self.last_postfix = 0.0

    def start_epoch(self, epoch: int) -> None:
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps, desc=f"epoch {epoch}/{self.n_epochs}", unit="batch", leave=False,
                            file=self.bar_stream, dynamic_ncols=True)

    def on_batch(self, batch: int, loss: torch.Tensor) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.monotonic()
        if now - self.last_postfix > 1.0:
            self.last_postfix = now
            self.bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)

    def end_epoch(self, record: EpochRecord) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print(format_epoch(record, self.n_epochs, self.split), file=self.out, flush=True)
