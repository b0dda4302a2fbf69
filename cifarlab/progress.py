"""Progress output: a live bar per epoch in a terminal; plain lines in a log file.

The bar is redrawn after every batch but reads the loss value (a host sync) at most once a second.
Without a terminal there is no bar (its redraws would fill a log file); instead one line per epoch,
and within a long epoch (a deep model on a CPU) a line at most once a minute, so a log shows the run
is alive and when the epoch will end.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

import torch

from cifarlab.records import EpochRecord


def format_epoch(record: EpochRecord, n_epochs: int, split: str | None) -> str:
    val = (f"  {split} loss {record.val_loss:.4f}  {split} acc {100 * record.val_acc:.2f}%"
           if record.val_acc is not None else "")
    return (f"epoch {record.epoch:>{len(str(n_epochs))}}/{n_epochs}  train loss {record.train_loss:.4f}  "
            f"train acc {100 * record.train_acc:.2f}%{val}  lr {record.lr:.3g}  {record.seconds:.1f}s")


LOG_EVERY_SECONDS = 60.0  # without a terminal: the most often a line is written within an epoch


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class EpochProgress:
    def __init__(self, n_epochs: int, steps_per_epoch: int, split: str | None, out: TextIO | None = None,
                 bar_stream: TextIO | None = None) -> None:
        self.n_epochs, self.steps, self.split = n_epochs, steps_per_epoch, split
        self.out = out or sys.stdout  # looked up now, not at import: tests and notebooks swap the streams
        self.bar_stream = bar_stream or sys.stderr
        self.live = self.bar_stream.isatty()
        self.bar = None
        self.last_postfix = 0.0
        self.epoch, self.batches_seen, self.epoch_started, self.last_line = 0, 0, 0.0, 0.0

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_seen = epoch, 0
        self.epoch_started = self.last_line = time.monotonic()
        if self.live:
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps, desc=f"epoch {epoch}/{self.n_epochs}", unit="batch", leave=False,
                            file=self.bar_stream, dynamic_ncols=True)

    def on_batch(self, batch: int, loss: torch.Tensor) -> None:
        if self.bar is None:
            self._log_line(batch, loss)
            return
        self.bar.update(1)
        now = time.monotonic()
        if now - self.last_postfix > 1.0:
            self.last_postfix = now
            self.bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)

    def _log_line(self, batch: int, loss: torch.Tensor) -> None:
        """`batch` counts from the epoch's start (a resumed epoch starts part-way); the rate counts
        only the batches this process ran."""
        self.batches_seen += 1
        now = time.monotonic()
        if now - self.last_line < LOG_EVERY_SECONDS or batch >= self.steps:
            return
        self.last_line = now
        rate = self.batches_seen / max(now - self.epoch_started, 1e-9)
        print(f"epoch {self.epoch}/{self.n_epochs}  batch {batch}/{self.steps}  loss {loss.item():.4f}  "
              f"{rate:.2f} batches/s, {_duration((self.steps - batch) / rate)} to the epoch's end",
              file=self.out, flush=True)

    def end_epoch(self, record: EpochRecord) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        print(format_epoch(record, self.n_epochs, self.split), file=self.out, flush=True)
