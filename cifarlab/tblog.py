"""TensorBoard event files beside metrics.csv (`train --tensorboard`), an optional extra.

`tensorboard` is a large dependency most runs never need, so it is only imported when asked for,
and checked before the run folder exists: a missing package fails at once, leaving nothing behind.
"""
from __future__ import annotations

from pathlib import Path

from cifarlab.engine import EpochRecord
from cifarlab.errors import CifarlabError

# metrics.csv column -> TensorBoard tag; grouped so train and validation share a chart
TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train",
        "val_acc": "accuracy/val", "lr": "lr", "seconds": "seconds_per_epoch"}


def require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401  (SummaryWriter needs it; torch does not ship it)
    except ImportError:
        raise CifarlabError("--tensorboard: the 'tensorboard' package is not installed "
                            "(pip install 'cifarlab[tensorboard]' or pip install tensorboard)") from None


class TensorBoardLog:
    """One scalar per metric per epoch, written into the run folder (`tensorboard --logdir RUN_DIR`)."""

    def __init__(self, run_dir: Path) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))

    def write(self, record: EpochRecord) -> None:
        for column, tag in TAGS.items():
            value = getattr(record, column)
            if value is not None:
                self.writer.add_scalar(tag, value, record.epoch)
        self.writer.flush()  # readable while the run goes on, like metrics.csv

    def close(self) -> None:
        self.writer.close()
