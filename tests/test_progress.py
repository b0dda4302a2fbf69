"""Progress output: a bar in a terminal, plain lines (per epoch, and at most once a minute) in a log."""
from __future__ import annotations

import io

import torch

from cifarlab import progress
from cifarlab.records import EpochRecord
from cifarlab.progress import EpochProgress


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


RECORD = EpochRecord(epoch=1, train_loss=1.5, train_acc=0.4, val_loss=1.25, val_acc=0.5, lr=0.1, seconds=300.0)


def test_a_log_file_gets_an_epoch_line_and_a_line_a_minute_within_a_long_epoch(monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out, bar_stream = io.StringIO(), io.StringIO()  # neither is a terminal, as when stdout goes to a file
    shown = EpochProgress(2, 100, "val", out=out, bar_stream=bar_stream)
    shown.start_epoch(1)
    for batch in range(1, 101):
        clock.now += 1.5  # 100 batches in 150 s: lines after 60 s (batch 40) and 120 s (batch 80)
        shown.on_batch(batch, torch.tensor(2.0 - batch / 100))
    shown.end_epoch(RECORD)
    lines = out.getvalue().splitlines()
    assert lines == [
        "epoch 1/2  batch 40/100  loss 1.6000  0.67 batches/s, 1m30s to the epoch's end",
        "epoch 1/2  batch 80/100  loss 1.2000  0.67 batches/s, 30s to the epoch's end",
        "epoch 1/2  train loss 1.5000  train acc 40.00%  val loss 1.2500  val acc 50.00%  lr 0.1  300.0s",
    ]
    assert bar_stream.getvalue() == ""  # no bar redraws in a file


def test_a_resumed_epoch_counts_its_rate_from_the_batches_it_ran(monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    shown = EpochProgress(1, 100, None, out=out, bar_stream=io.StringIO())
    shown.start_epoch(1)
    for batch in range(51, 101):  # resumed after 50 batches
        clock.now += 3.0
        shown.on_batch(batch, torch.tensor(1.0))
    first = out.getvalue().splitlines()[0]
    assert first.startswith("epoch 1/1  batch 70/100") and "0.33 batches/s, 1m30s" in first


def test_a_terminal_gets_a_live_bar_and_only_the_epoch_line_on_stdout(monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out, terminal = io.StringIO(), Terminal()
    shown = EpochProgress(1, 10, "val", out=out, bar_stream=terminal)
    shown.start_epoch(1)
    for batch in range(1, 11):
        clock.now += 100.0
        shown.on_batch(batch, torch.tensor(1.0))
    shown.end_epoch(RECORD)
    assert "epoch 1/1" in terminal.getvalue() and "\r" in terminal.getvalue()  # tqdm redraws in place
    assert out.getvalue().splitlines() == [
        "epoch 1/1  train loss 1.5000  train acc 40.00%  val loss 1.2500  val acc 50.00%  lr 0.1  300.0s"]
