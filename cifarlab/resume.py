"""Resumable training state: RUN_DIR/checkpoint.pt, and stopping cleanly on Ctrl-C or SIGTERM.

The checkpoint is a plain dict of tensors and JSON-compatible values, so it loads with
`torch.load(weights_only=True)` and a crafted file cannot run code. It holds everything the next
step depends on: model, optimizer and schedule state; where the run stands (epoch, batches done in
it, the epoch's running sums and starting learning rate); the loader generator's state at the start
of that epoch (the resumed pass redraws the same order and replays the skipped batches' draws); the
Python, NumPy, torch and CUDA random states; the finished epochs' metrics rows; and the config.
Written with a temporary file, fsync and rename: a kill at any instant leaves the last good one.
"""
from __future__ import annotations

import random
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cifarlab.checkpoint import MODEL_FILE, safe_load
from cifarlab.data.cache import atomic_torch_save
from cifarlab.engine import EpochRecord, EpochSums
from cifarlab.errors import CifarlabError

if TYPE_CHECKING:
    from cifarlab.config import TrainConfig
    from cifarlab.engine import History

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "cifarlab.checkpoint/1"
INTERRUPTED_STATUS = 3  # stopped by a signal after saving a checkpoint (130 is a bare KeyboardInterrupt)


class RunInterrupted(Exception):
    """Training stopped on request after saving a checkpoint; the CLI prints how to resume."""

    def __init__(self, run_dir: Path, signal_name: str, where: str) -> None:
        super().__init__(f"stopped by {signal_name} {where}; saved {run_dir / CHECKPOINT_FILE}")
        self.run_dir = run_dir


# --- random states as tensors and plain values -----------------------------------------------------

def rng_states() -> dict:
    """The global generators' states in a form `weights_only=True` loads (no numpy arrays)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": [version, list(internal), gauss],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --- the checkpoint --------------------------------------------------------------------------------

def training_state(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader_state: torch.Tensor,
                   epoch: int, sums: EpochSums | None, history: list[EpochRecord], config: dict,
                   ema_state: dict | None = None) -> dict:
    """Where the run stands: about to run batch `sums.batches + 1` of `epoch` (sums None: its first)."""
    return {
        "format": CHECKPOINT_FORMAT, "config": config, "epoch": epoch,
        "batches": sums.batches if sums else 0,
        "sums": ({"loss": sums.loss.detach().cpu(), "acc": sums.acc.detach().cpu(), "lr": sums.lr}
                 if sums else None),
        "loader_state": loader_state.clone(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "ema": ema_state,  # WeightEMA.state_dict(), or None without --ema
        "rng": rng_states(),
        "history": [vars(record).copy() for record in history],
    }


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    """Write atomically; on failure (a full disk) the previous checkpoint is left as it was."""
    path = run_dir / CHECKPOINT_FILE
    try:
        atomic_torch_save(state, path)
    except (OSError, RuntimeError) as error:  # torch reports some write failures as RuntimeError
        kept = "the previous checkpoint is intact" if path.exists() else "no earlier checkpoint exists"
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:200]
        raise CifarlabError(f"{path}: could not save the checkpoint ({reason}); {kept}") from None
    return path


def load_checkpoint(run_dir: Path) -> dict:
    """The checkpoint of a run folder, checked to be one, read with weights_only=True."""
    if not run_dir.is_dir():
        raise CifarlabError(f"--resume {run_dir}: no such run folder")
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        if (run_dir / MODEL_FILE).exists():
            raise CifarlabError(f"--resume {run_dir}: the run has finished ({MODEL_FILE} is written); "
                                f"nothing to resume")
        raise CifarlabError(f"--resume {run_dir}: no {CHECKPOINT_FILE} (the run stopped before its first "
                            f"checkpoint, or this is not a run folder); start it again")
    state = safe_load(path)
    keys = {"config", "epoch", "batches", "sums", "loader_state", "model", "optimizer", "scheduler", "rng", "history"}
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or not keys <= state.keys():
        raise CifarlabError(f"{path}: not a cifarlab training checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def restore(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, loader,
            device: torch.device) -> tuple[int, EpochSums | None, list[EpochRecord]]:
    """Load a checkpoint into freshly built objects; returns (epoch, its running sums, finished epochs)."""
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CifarlabError(f"{CHECKPOINT_FILE}: does not fit the run's model or optimizer "
                            f"({str(error).splitlines()[0][:200]})") from None
    sums = None
    if state["batches"]:
        saved = state["sums"]
        sums = EpochSums(saved["loss"].to(device), saved["acc"].to(device),
                         torch.zeros((), device=device, dtype=torch.long), state["batches"], saved["lr"])
    loader.resume_at(state["loader_state"], state["batches"])
    set_rng_states(state["rng"])  # last: building the objects above may draw from them
    return state["epoch"], sums, [EpochRecord(**row) for row in state["history"]]


def remove_temporaries(run_dir: Path) -> None:
    """Half-written temporary files a killed run left (their targets are intact: rename is atomic)."""
    for stray in run_dir.glob("*.tmp"):
        stray.unlink(missing_ok=True)
    for stray in run_dir.glob(".*.tmp"):
        stray.unlink(missing_ok=True)


# --- when to save --------------------------------------------------------------------------------

def _weights_finite(model: torch.nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True  # one host read, at checkpoints only


class Checkpointer:
    """The trainer's checkpoint policy: every `checkpoint_every` steps, at each epoch's end, and when a
    stop is requested. A diverged run is never saved: training stops, naming the step where the loss
    went NaN or infinite, and the last good checkpoint stays as it was."""

    def __init__(self, run_dir: Path, config: "TrainConfig", model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, loader, history: "History", ema=None) -> None:
        self.run_dir, self.config, self.model, self.ema = run_dir, config, model, ema
        self.optimizer, self.scheduler, self.loader, self.history = optimizer, scheduler, loader, history
        self.sums: EpochSums | None = None  # the current epoch's, to name the bad batch
        self.last_good: str | None = None

    def on_step(self, epoch: int, sums: EpochSums, stop: str | None) -> None:
        self.sums = sums
        step = (epoch - 1) * len(self.loader) + sums.batches
        every = self.config.checkpoint_every
        if stop or (every and step % every == 0 and sums.batches < len(self.loader)):  # the epoch's end saves anyway
            self._save(epoch, sums)
        if stop:
            raise RunInterrupted(self.run_dir, stop, f"at epoch {epoch}, batch {sums.batches}/{len(self.loader)}")

    def end_epoch(self, record: EpochRecord, stop: str | None) -> None:
        losses = [record.train_loss] + ([record.val_loss] if record.val_loss is not None else [])
        if not all(np.isfinite(losses)):
            raise self._diverged(record.epoch, len(self.loader))
        self._save(record.epoch + 1, None)
        self.sums = None
        if stop:
            raise RunInterrupted(self.run_dir, stop, f"after epoch {record.epoch}")

    def _save(self, epoch: int, sums: EpochSums | None) -> None:
        if (sums is not None and int(sums.bad_batch)) or not _weights_finite(self.model):
            raise self._diverged(epoch - (sums is None), sums.batches if sums else len(self.loader))
        loader_state = self.loader.epoch_state if sums is not None else self.loader.state()
        save_checkpoint(self.run_dir, training_state(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, loader_state=loader_state,
            epoch=epoch, sums=sums, history=self.history.records, config=self.config.to_dict(),
            ema_state=self.ema.state_dict() if self.ema is not None else None))
        self.last_good = f"epoch {epoch}, batch {sums.batches if sums else 0}"

    def _diverged(self, epoch: int, batch: int) -> CifarlabError:
        bad = int(self.sums.bad_batch) if self.sums is not None else 0
        what = "the loss became NaN or infinite at" if bad else "the weights became NaN or infinite by"
        batch = bad or batch
        step = (epoch - 1) * len(self.loader) + batch
        kept = (f"kept the last good checkpoint {self.run_dir / CHECKPOINT_FILE} ({self.last_good})"
                if self.last_good else "no checkpoint had been saved before it")
        return CifarlabError(f"training diverged: {what} epoch {epoch}, batch {batch} (step {step}); stopped and "
                             f"{kept}; try a lower --lr than {self.config.lr}")


# --- stopping on a signal --------------------------------------------------------------------------

class StopSignals:
    """While training, SIGINT and SIGTERM ask the loop to stop at the next step (it saves first).

    A second Ctrl-C while it is stopping raises KeyboardInterrupt at once. Handlers are restored on exit;
    outside the main thread (where Python cannot install them) this does nothing.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
