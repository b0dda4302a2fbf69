"""One training run end to end: config -> data -> `build_run` -> epochs -> run folder.

This is what `cifarlab train` calls. One batch goes `run_training` -> `train_epochs` (the epoch loop,
with progress, checkpoints and stop handling written out in order) -> `engine.train_step` -> the
optimizer. The notebook-style API lives in `engine` and shares that step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifarlab.budget import TimeBudget
from cifarlab.build import (Run, Runtime, build_run, epoch_count, epoch_image_size, freeze_whiten_bias,
                            resolve_runtime, total_steps)
from cifarlab.config import TrainConfig
from cifarlab.data import DataBundle, load_data
from cifarlab.device import gpu_memory_fraction, keep_freed_memory, limit_gpu_memory, pick_device, set_cpu_threads
from cifarlab.distributed import (DistInfo, all_reduce_mean, barrier, broadcast_object, env_info, report_failure,
                                  setup, teardown)
from cifarlab.engine import evaluate, train_step
from cifarlab.errors import CifarlabError
from cifarlab.evaluation import write_eval_views
from cifarlab.layer_stats import open_layer_stats
from cifarlab.progress import EpochProgress
from cifarlab.records import EpochRecord, EpochSums, EvalResult, History
from cifarlab.resume import Checkpointer, Start, StopSignals, open_checkpoint, restore
from cifarlab.rundir import (CONFIG_FILE, EVAL_DIR, MODEL_FILE, MetricsLog, RunLock, device_description,
                             finish_run, new_run_dir, remove_temporaries, require_tensorboard, save_model, write_json)


@dataclass
class Session:
    """One process's part in a run, everything built before its first step."""

    config: TrainConfig
    runtime: Runtime
    bundle: DataBundle
    run_dir: Path
    run: Run
    start: Start  # where training begins (a resumed run: part-way)
    tensorboard: bool
    threads: int | None  # CPU threads used (None on a GPU)
    started: float  # time.perf_counter() when the command began
    budget_plan: dict | None = None  # what a --time-budget plan assumed (step and evaluation seconds)


def run_training(config: TrainConfig, out: str | None = None, tensorboard: bool = False,
                 resume: str | None = None) -> Path:
    """Train as `config` says and write the run folder; returns its path.

    `tensorboard` also writes TensorBoard event files into the run folder (the optional extra).
    `resume` continues the run in that folder from its checkpoint.pt, with the run's own config.
    """
    try:
        with contextlib.ExitStack() as stack:  # the run folder's lock, signal handlers, files: released on any exit
            session = open_session(config, out, tensorboard, resume, stack)
            train_started = time.perf_counter()
            history, last_eval = train_epochs(session, stack)
            if session.runtime.dist.is_main:  # the other ranks train and evaluate but write nothing
                write_results(session, history, last_eval, time.perf_counter() - train_started)
            # ranks leave together: one tearing its process group down while rank 0 still writes could end in
            # gloo aborting it ("terminate called without an active exception", once in a clean-clone run)
            barrier()
            return session.run_dir
    except Exception as error:
        report_failure(env_info(), error)
        raise


def train_epochs(session: Session, stack: contextlib.ExitStack) -> tuple[History, EvalResult | None]:
    """The epochs from the session's start on. Rank 0 logs, checkpoints, and stops cleanly on a signal
    (after saving); the other ranks train and evaluate. Under --time-budget the first steps are timed
    and the run's length fixed from them. Returns the history (a resumed run's earlier epochs, then
    these) and the last evaluation (None when nothing is evaluated or no epoch ran)."""
    config, run, start, runtime = session.config, session.run, session.start, session.runtime
    main, steps_per_epoch = runtime.dist.is_main, len(run.train_loader)
    history = History(list(start.done))
    # other ranks: no live bar (their stdout, /dev/null by now, is no terminal)
    progress = EpochProgress(epoch_count(config, steps_per_epoch), steps_per_epoch, session.bundle.eval_split,
                             bar_stream=None if main else sys.stdout)
    log = stack.enter_context(contextlib.closing(MetricsLog(session.run_dir, session.tensorboard))) if main else None
    for record in history.records if main else []:
        log.write(record)
    # the other ranks keep the default SIGTERM: torchrun's agent ends them with it when a rank fails
    stop = stack.enter_context(StopSignals()) if main else StopSignals()
    saver = Checkpointer(session.run_dir, config, run, history) if main else None
    if main and config.layer_stats:  # hooks on the model and the optimizer: the loop below is the same without
        stack.enter_context(_layer_recorder(session, start.steps_done(steps_per_epoch)))
    budget = _time_budget(session)
    last_eval, epoch = None, start.epoch
    try:
        while epoch <= epoch_count(config, steps_per_epoch):  # a time budget may change it in the first one
            started = time.perf_counter()
            sums = (start.sums if epoch == start.epoch else None) or EpochSums.zeros(
                runtime.device, run.step.optimizer.param_groups[0]["lr"])
            progress.start_epoch(epoch)
            run.train_loader.set_epoch(epoch, epoch_image_size(config, epoch, steps_per_epoch))
            freeze_whiten_bias(run, config, runtime, epoch)
            run.step.model.train()
            for batch in run.train_loader:
                loss, _ = train_step(run.step, batch, sums)
                progress.on_batch(sums.batches, loss)
                if budget is not None and budget.after_step(loss) is not None:  # planned, or planned again
                    config = _follow_plan(session, budget, progress, saver)
                if saver is not None:
                    saver.after_step(epoch, sums, stop.requested)
                if (epoch - 1) * steps_per_epoch + sums.batches == total_steps(config, steps_per_epoch) \
                        and sums.batches < steps_per_epoch:
                    break  # a fraction of --epochs, --max-steps or a time budget's plan ends part-way through
            last_epoch = epoch == epoch_count(config, steps_per_epoch)
            evaluates = last_epoch or (config.eval_each_epoch and not config.time_budget)
            last_eval = (evaluate(run.final_model, run.eval_loader, runtime.device, runtime.amp_dtype)
                         if run.eval_loader is not None and evaluates else None)
            record = _epoch_record(epoch, sums, last_eval, time.perf_counter() - started, runtime)
            progress.end_epoch(record)
            history.records.append(record)
            if main:
                log.write(record)
                saver.end_epoch(record, stop.requested)
            epoch += 1
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory(runtime.device, config) from None
    stop.restore()  # the run's files are written next: Ctrl-C interrupts them as usual
    return history, last_eval


def _layer_recorder(session: Session, steps_done: int) -> contextlib.AbstractContextManager:
    """--layer-stats' hooks; none where the steps do not run the model eagerly (compiled or replayed
    from CUDA graphs, the hooks would not see the layers)."""
    config, run, runtime = session.config, session.run, session.runtime
    graphed = config.cuda_graph and runtime.device.type == "cuda" and not runtime.dist.enabled
    if config.compile or graphed:
        print(f"--layer-stats: not recorded with {'--compile' if config.compile else '--cuda-graph'} "
              f"(its hooks need eager steps)")
        return contextlib.nullcontext()
    return open_layer_stats(session.run_dir, run.model, run.step.optimizer, config.layer_stats, steps_done)


def _follow_plan(session: Session, budget: TimeBudget, progress: EpochProgress,
                 saver: Checkpointer | None) -> TrainConfig:
    """A time budget's (new) plan becomes the run's config: the loop, the progress and the checkpoints follow it."""
    session.config, session.budget_plan = budget.config, budget.estimate
    progress.n_epochs = budget.config.epochs
    if saver is not None:
        saver.config = budget.config
    return budget.config


def _time_budget(session: Session) -> TimeBudget | None:
    """The planner of a budgeted run that has not been planned yet (a resumed one keeps its plan)."""
    config = session.config
    if not config.time_budget or config.max_steps:
        return None
    split = session.bundle.eval_split
    return TimeBudget(config, session.run, time.perf_counter(), len(session.bundle.split(split)) if split else 0)


def _epoch_record(epoch: int, sums: EpochSums, val: EvalResult | None, seconds: float,
                  runtime: Runtime) -> EpochRecord:
    train_loss, train_acc = sums.means()
    if runtime.dist.enabled:  # each rank's training means cover its own shard: report their mean
        train_loss, train_acc = all_reduce_mean([train_loss, train_acc], runtime.device)
    return EpochRecord(epoch, train_loss, train_acc, val.loss if val else None, val.accuracy if val else None,
                       sums.lr, seconds)


# --- before the first step ---------------------------------------------------------------------------

def open_session(config: TrainConfig, out: str | None, tensorboard: bool, resume: str | None,
                 stack: contextlib.ExitStack) -> Session:
    """Everything a run needs before its first step: processes, data, run folder, objects, resume state."""
    started = time.perf_counter()
    state = None
    if resume is not None:
        run_dir, state = _open_checkpoint(resume, stack)
        config = TrainConfig.from_dict(state["config"])
    config = config.validate()
    if config.compile:
        # torch._dynamo will be imported at the first step (about 1 s): start that import now, in a thread,
        # so it runs while the data loads (the GIL is mostly free there) instead of after
        threading.Thread(target=importlib.import_module, args=("torch._dynamo",), name="warm-imports").start()
    dist_info, device = _start_processes(config, stack)
    threads = set_cpu_threads(dist_info.local_world) if device.type == "cpu" else None
    keep_freed_memory()  # steps that free and re-allocate their activations stop page-faulting them in
    notes: list[str] = []
    bundle = load_data(config.data, config.dataset, config.val_split, config.seed, config.image_size, notes)
    for note in notes:
        print(note)
    config, runtime = resolve_runtime(config, bundle, device, dist_info)  # precision and layout, measured
    seed_everything(config.seed)
    if tensorboard:
        require_tensorboard()  # before the run folder exists: a missing package leaves nothing behind
    if state is None:  # only after the data loaded: a bad source leaves no folder
        run_dir = _create_run_dir(out, config, runtime, stack)
    print(describe_data(bundle, config))
    print(f"device: {device_description(runtime.device)}, precision {runtime.amp_dtype or torch.float32}, "
          f"run folder {run_dir}")
    if runtime.dist.enabled:
        print(f"distributed: {runtime.dist.world} processes ({torch.distributed.get_backend()}), "
              f"{config.batch_size // runtime.dist.world} images per process per step")
    run = build_run(config, bundle, runtime)
    if config.max_steps:  # the steps fix the epochs (the last may stop part-way), whatever --epochs said
        config = dataclasses.replace(config, epochs=math.ceil(config.max_steps / len(run.train_loader)))
    if runtime.dist.is_main:
        write_json(run_dir / CONFIG_FILE, config.to_dict())
    start = Start()
    if state is not None:
        if runtime.dist.is_main:
            remove_temporaries(run_dir)
        start = restore(state, run)
        print(f"resuming {run_dir} at epoch {start.epoch}, batch {start.sums.batches if start.sums else 0}"
              f"/{len(run.train_loader)}")
    return Session(config, runtime, bundle, run_dir, run, start, tensorboard, threads, started)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def describe_data(bundle: DataBundle, config: TrainConfig) -> str:
    split = bundle.eval_split
    if split == "val":
        held = f"evaluating on val: {len(bundle.val)} images held out of the training source (seed {config.seed})"
    elif split == "test":
        held = f"evaluating on the source's test split ({len(bundle.test)} images)"
    else:
        held = "no evaluation split (--val-split 0 and the source has no test split)"
    return f"data: {bundle.source}: {len(bundle.train)} training images, {len(bundle.classes)} classes; {held}"


def _open_checkpoint(resume: str, stack: contextlib.ExitStack) -> tuple[Path, dict]:
    """The run folder to resume and its checkpoint; rank 0 locks the folder.

    Under torchrun every rank reads the checkpoint itself (so the run folder must be on storage every
    node sees), before the process group forms: no rank can write a newer one while another still reads."""
    run_dir = Path(resume).expanduser()
    if run_dir.is_dir() and env_info().is_main:
        stack.enter_context(RunLock(run_dir))  # before reading: another process may be writing it
    return run_dir, open_checkpoint(run_dir)


def _start_processes(config: TrainConfig, stack: contextlib.ExitStack) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group if this process is one of its ranks; silence the other ranks."""
    dist_info, device = setup(pick_device(config.device))  # one process unless torchrun started this one
    stack.callback(teardown)
    if not dist_info.is_main:  # only rank 0 prints; errors still reach stderr
        stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    if dist_info.enabled and config.batch_size % dist_info.world:
        raise CifarlabError(f"--batch-size {config.batch_size}: the global batch must divide evenly over "
                            f"{dist_info.world} processes")
    note = limit_gpu_memory(gpu_memory_fraction(config.gpu_memory_fraction), device)  # this rank's own GPU
    if note:
        print(note)
    return dist_info, device


def _create_run_dir(out: str | None, config: TrainConfig, runtime: Runtime, stack: contextlib.ExitStack) -> Path:
    """Rank 0 names, creates and locks the folder; the other ranks learn its name."""
    run_dir = None
    if runtime.dist.is_main:
        run_dir = new_run_dir(out, config.recipe)
        stack.enter_context(RunLock(run_dir))
    return broadcast_object(run_dir)


def out_of_memory(device: torch.device, config: TrainConfig) -> CifarlabError:
    smaller = max(config.batch_size // 2, 1)
    fraction = gpu_memory_fraction(config.gpu_memory_fraction)
    cap = (f"; this process may use {fraction:g} of the GPU's memory (--gpu-memory-fraction), a larger share "
           f"helps if the GPU is not shared" if fraction is not None and device.type == "cuda" else "")
    return CifarlabError(f"out of memory on {device} with --batch-size {config.batch_size} (evaluation uses "
                         f"{config.eval_batch_size}); try --batch-size {smaller}, or a smaller model{cap}")


# --- after the last step -----------------------------------------------------------------------------

def write_results(session: Session, history: History, last_eval: EvalResult | None, train_seconds: float) -> None:
    """model.pt, test-time augmentation once, the final line, eval.json, and summary.json last: it marks
    the run complete. Numbers only: `report` draws the pictures (matplotlib's import and drawing took
    0.7 s of a 18 s run)."""
    config, run, bundle, runtime = session.config, session.run, session.bundle, session.runtime
    write_json(session.run_dir / CONFIG_FILE, config.to_dict())  # again: a time budget's plan is in it now
    save_model(session.run_dir / MODEL_FILE, run.final_model, run.info)
    split = bundle.eval_split
    if last_eval is None and run.eval_loader is not None:  # resumed after its last epoch: predict again
        last_eval = evaluate(run.final_model, run.eval_loader, runtime.device, runtime.amp_dtype)
    # test-time augmentation once, on the final weights: epochs are compared without it (cheaper, and
    # what `eval` reports by default); the recipe's headline figure is this one (`eval --tta N`). The
    # unaugmented view is the last evaluation's, not computed again
    tta_started = time.perf_counter()
    tta = (evaluate(run.final_model, run.eval_loader, runtime.device, runtime.amp_dtype, config.tta, last_eval,
                    config.tta_share)
           if config.tta and run.eval_loader is not None else None)
    summary = _summary(session, history, tta, train_seconds, time.perf_counter() - tta_started)
    final = f"{split} accuracy {100 * summary['accuracy']:.2f}%" if summary["accuracy"] is not None else "done"
    if tta is not None:
        final += f" ({100 * tta.accuracy:.2f}% with test-time augmentation level {config.tta})"
    print(f"{final} after {config.epochs:g} epochs in {summary['wall_seconds']:.1f}s; results in {session.run_dir} "
          f"(cifarlab report {session.run_dir} draws them)", flush=True)
    if last_eval is not None:  # eval.json, the numbers of the views; `report` draws them
        write_eval_views(session.run_dir / EVAL_DIR, last_eval, bundle.classes, {"split": split, "data": bundle.source})
    finish_run(session.run_dir, summary)


def _summary(session: Session, history: History, tta: EvalResult | None, train_seconds: float,
             tta_seconds: float) -> dict:
    """What summary.json holds: the result, how long it took and on what (and a time budget's plan:
    the steps chosen and the seconds its training and final evaluation took)."""
    config, run, start, runtime = session.config, session.run, session.start, session.runtime
    last, split = history.records[-1], session.bundle.eval_split
    # this process's steps only: a resumed run's earlier steps were timed by the run that made them
    steps_per_epoch = len(run.train_loader)
    steps_run = total_steps(config, steps_per_epoch) - start.steps_done(steps_per_epoch)
    return {
        "recipe": config.recipe, "model": config.model, "eval_split": split,
        "parameters": run.parameters,
        "accuracy": last.val_acc, "loss": last.val_loss, "train_accuracy": last.train_acc,
        "tta": {"level": config.tta, "accuracy": tta.accuracy, "loss": tta.loss} if tta is not None else None,
        "epochs": config.epochs, "train_images": len(session.bundle.train),
        "eval_images": len(session.bundle.split(split)) if split else 0,
        "wall_seconds": round(time.perf_counter() - session.started, 3), "train_seconds": round(train_seconds, 3),
        "tta_seconds": round(tta_seconds, 3),
        "images_per_second": round(steps_run * config.batch_size / train_seconds, 1),
        "device": device_description(runtime.device), "threads": session.threads, "processes": runtime.dist.world,
        "precision": str(runtime.amp_dtype or torch.float32), "channels_last": config.channels_last,
        "time_budget": ({"seconds": config.time_budget, "steps": config.max_steps, "assumed": session.budget_plan,
                         "used_seconds": round(train_seconds + tta_seconds, 3)} if config.time_budget else None),
    }
