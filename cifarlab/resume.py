"""Resumable training state, when to save it, and stopping cleanly on Ctrl-C or SIGTERM.

The state is a plain dict of tensors and JSON-compatible values (`rundir` writes it atomically and
reads it with `weights_only=True`). It holds everything the next step depends on: model, optimizer,
schedule, gradient scaler and weight-average state; where the run stands (epoch, batches done in
it, the epoch's running sums and starting learning rate); the loader generator's state at the start
of that epoch (the resumed pass redraws the same order and replays the skipped batches' draws); the
Python, NumPy, torch and CUDA random states; the finished epochs' metrics rows; and the config.
"""
from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cifarlab.build import Run
from cifarlab.config import TrainConfig
from cifarlab.errors import CifarlabError, RunInterrupted
from cifarlab.records import EpochRecord, EpochSums, History
from cifarlab.rundir import CHECKPOINT_FILE, load_checkpoint, save_checkpoint

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

STATE_KEYS = {"config", "epoch", "batches", "sums", "loader_state", "model", "optimizer", "scheduler", "rng",
              "history"}


def training_state(run: Run, config: TrainConfig, epoch: int, sums: EpochSums | None,
                   history: list[EpochRecord]) -> dict:
    """Where the run stands: about to run batch `sums.batches + 1` of `epoch` (sums None: its first).
    Mid-epoch the loader state is the epoch's start (the resumed pass replays it); between epochs, now."""
    step = run.step
    return {
        "config": config.to_dict(), "epoch": epoch,
        "batches": sums.batches if sums else 0,
        "sums": ({"loss": sums.loss.detach().cpu(), "acc": sums.acc.detach().cpu(), "lr": sums.lr}
                 if sums else None),
        "loader_state": (run.train_loader.epoch_state if sums else run.train_loader.state()).clone(),
        "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": step.optimizer.state_dict(),
        "scheduler": step.scheduler.state_dict(),
        "scaler": step.scaler.state_dict(),  # empty unless fp16
        "ema": step.ema.state_dict() if step.ema is not None else None,
        "lookahead": step.lookahead.state_dict() if step.lookahead is not None else None,
        "rng": rng_states(),
        "history": [vars(record).copy() for record in history],
    }


def open_checkpoint(run_dir: Path) -> dict:
    return load_checkpoint(run_dir, STATE_KEYS)


@dataclass
class Start:
    """Where training starts: epoch `epoch`, continuing its running `sums` part-way (None: from its
    first batch), after the finished epochs `done`."""

    epoch: int = 1
    sums: EpochSums | None = None
    done: list[EpochRecord] = field(default_factory=list)

    def steps_done(self, steps_per_epoch: int) -> int:
        return (self.epoch - 1) * steps_per_epoch + (self.sums.batches if self.sums else 0)


def restore(state: dict, run: Run) -> Start:
    """Load a checkpoint into freshly built objects; returns where training continues."""
    step = run.step
    try:
        run.model.load_state_dict(state["model"])
        step.optimizer.load_state_dict(state["optimizer"])
        step.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            step.scaler.load_state_dict(state["scaler"])
        if step.ema is not None and state.get("ema") is not None:
            step.ema.load_state_dict(state["ema"])  # the average so far, not a fresh copy of the restored weights
        if step.lookahead is not None and state.get("lookahead") is not None:
            step.lookahead.load_state_dict(state["lookahead"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CifarlabError(f"{CHECKPOINT_FILE}: does not fit the run's model or optimizer "
                            f"({str(error).splitlines()[0][:200]})") from None
    sums = None
    if state["batches"]:
        saved, device = state["sums"], step.device
        sums = EpochSums(saved["loss"].to(device), saved["acc"].to(device),
                         torch.zeros((), device=device, dtype=torch.long), state["batches"], saved["lr"])
    run.train_loader.resume_at(state["loader_state"], state["batches"])
    set_rng_states(state["rng"])  # last: building the objects above may draw from them
    return Start(state["epoch"], sums, [EpochRecord(**row) for row in state["history"]])


# --- when to save --------------------------------------------------------------------------------

def _weights_finite(model: torch.nn.Module) -> bool:
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True  # one host read, at checkpoints only


class Checkpointer:
    """The trainer's checkpoint policy: every `checkpoint_every` steps, at each epoch's end (once
    `checkpoint_seconds` have passed since the last save), and when a stop is requested. A diverged
    run is never saved: training stops, naming the step where the loss went NaN or infinite, and the
    last good checkpoint stays as it was."""

    def __init__(self, run_dir: Path, config: TrainConfig, run: Run, history: History) -> None:
        self.run_dir, self.config, self.run, self.history = run_dir, config, run, history
        self.steps_per_epoch = len(run.train_loader)
        self.sums: EpochSums | None = None  # the current epoch's, to name the bad batch
        self.last_good: str | None = None
        self.saved_at = time.perf_counter()  # training starts from a state rebuilt exactly by `train` itself

    def after_step(self, epoch: int, sums: EpochSums, stop: str | None) -> None:
        self.sums = sums
        step = (epoch - 1) * self.steps_per_epoch + sums.batches
        every = self.config.checkpoint_every
        if stop or (every and step % every == 0 and sums.batches < self.steps_per_epoch):  # the epoch's end saves anyway
            self._save(epoch, sums)
        if stop:
            raise RunInterrupted(self.run_dir, stop, f"at epoch {epoch}, batch {sums.batches}/{self.steps_per_epoch}")

    def end_epoch(self, record: EpochRecord, stop: str | None) -> None:
        losses = [record.train_loss] + ([record.val_loss] if record.val_loss is not None else [])
        if not all(np.isfinite(losses)):
            raise self._diverged(record.epoch, self.steps_per_epoch)
        if stop or time.perf_counter() - self.saved_at >= self.config.checkpoint_seconds:
            self._save(record.epoch + 1, None)
        self.sums = None
        if stop:
            raise RunInterrupted(self.run_dir, stop, f"after epoch {record.epoch}")

    def _save(self, epoch: int, sums: EpochSums | None) -> None:
        if (sums is not None and int(sums.bad_batch)) or not _weights_finite(self.run.model):
            raise self._diverged(epoch - (sums is None), sums.batches if sums else self.steps_per_epoch)
        save_checkpoint(self.run_dir, training_state(self.run, self.config, epoch, sums, self.history.records))
        self.saved_at = time.perf_counter()
        self.last_good = f"epoch {epoch}, batch {sums.batches if sums else 0}"

    def _diverged(self, epoch: int, batch: int) -> CifarlabError:
        bad = int(self.sums.bad_batch) if self.sums is not None else 0
        what = "the loss became NaN or infinite at" if bad else "the weights became NaN or infinite by"
        batch = bad or batch
        step = (epoch - 1) * self.steps_per_epoch + batch
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
