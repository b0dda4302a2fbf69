"""One training run end to end: config -> data -> model -> epochs -> run folder.

This is what `cifarlab train` calls; the notebook-style API lives in `engine` and works without it.
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifarlab.checkpoint import MODEL_FILE, ModelInfo, save_model
from cifarlab.config import TrainConfig
from cifarlab.data import Augment, DataBundle, TensorLoader, channel_stats, load_data
from cifarlab.device import autocast_dtype, pick_device, set_cpu_threads
from cifarlab.distributed import (DistInfo, all_reduce_mean, broadcast_path, env_info, report_failure, setup,
                                  shard_log_path, teardown)
from cifarlab.ema import WeightEMA
from cifarlab.engine import EpochRecord, EvalResult, History, evaluate, fit_epochs
from cifarlab.errors import CifarlabError
from cifarlab.models import create_model
from cifarlab.optim import build_optimizer, build_scheduler
from cifarlab.plots import save_curves
from cifarlab.progress import EpochProgress
from cifarlab.resume import CHECKPOINT_FILE, Checkpointer, StopSignals, load_checkpoint, remove_temporaries, restore
from cifarlab.runs import MetricsWriter, RunLock, device_description, new_run_dir, versions, write_json
from cifarlab.tblog import TensorBoardLog, require_tensorboard
from cifarlab.views import EVAL_DIR, write_eval_views


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


def make_loaders(bundle: DataBundle, config: TrainConfig, device: torch.device, mean: list[float],
                 std: list[float], dist_info: DistInfo = DistInfo()) -> tuple[TensorLoader, TensorLoader | None]:
    """The training loader (this rank's shard of each global batch under torchrun) and the evaluation
    loader (the whole split on every rank: identical weights give identical results, no reduction)."""
    augment = Augment(translate=config.translate, flip=config.flip, randaugment=config.randaugment,
                      cutout=config.cutout, mixup=config.mixup, cutmix=config.cutmix)
    if not (config.translate or config.flip or augment.extras):
        augment = None
    train_loader = TensorLoader(bundle.train, config.batch_size, device, mean, std, shuffle=True, augment=augment,
                                drop_last=len(bundle.train) > config.batch_size, seed=config.seed,
                                rank=dist_info.rank, world=dist_info.world, shard_log=shard_log_path(dist_info),
                                channels_last=config.channels_last)
    split = bundle.eval_split
    eval_loader = (TensorLoader(bundle.split(split), config.eval_batch_size, device, mean, std,
                                channels_last=config.channels_last) if split is not None else None)
    return train_loader, eval_loader


def memory_format(config: TrainConfig) -> torch.memory_format:
    return torch.channels_last if config.channels_last else torch.contiguous_format


def data_dependent_init(model: torch.nn.Module, bundle: DataBundle, device: torch.device, mean: list[float],
                        std: list[float], n_images: int = 5000) -> None:
    """Models that set weights from data (the fast net's whitening stem) get the first training images.

    The same images on every rank and every run with the same seed, so the result is reproducible."""
    init = getattr(model, "init_from_data", None)
    if init is not None:
        sample = bundle.train.subset(torch.arange(min(n_images, len(bundle.train))))
        images, _ = next(iter(TensorLoader(sample, len(sample), device, mean, std)))
        init(images)


def wrap_distributed(model: torch.nn.Module, config: TrainConfig, dist_info: DistInfo,
                     device: torch.device) -> torch.nn.Module:
    """DDP around `model` under torchrun (optionally with SyncBatchNorm); `model` itself for one process.

    SyncBatchNorm replaces the BatchNorm modules inside `model` in place, so the saved weights keep the
    plain BatchNorm names and load anywhere."""
    if not dist_info.enabled:
        return model
    if config.sync_bn:
        if device.type != "cuda":
            raise CifarlabError("--sync-bn: torch's SyncBatchNorm runs on CUDA only; drop it on CPU")
        for name, child in list(model.named_children()):
            setattr(model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def out_of_memory(device: torch.device, config: TrainConfig) -> CifarlabError:
    smaller = max(config.batch_size // 2, 1)
    return CifarlabError(f"out of memory on {device} with --batch-size {config.batch_size} (evaluation uses "
                         f"{config.eval_batch_size}); try --batch-size {smaller}, or a smaller model")


@dataclass
class Parts:
    """The objects one run trains with, built from its config and data.

    `model` is what is saved; `train_model` is what trains (`model` in a DDP wrapper under torchrun);
    `final_model` is what is evaluated and saved: the weight EMA when there is one."""

    model: torch.nn.Module
    train_model: torch.nn.Module
    ema: WeightEMA | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: TensorLoader
    eval_loader: TensorLoader | None
    info: ModelInfo  # what model.pt records beside the weights: the builder's arguments, classes, normalisation

    @property
    def final_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model


def build_parts(config: TrainConfig, bundle: DataBundle, device: torch.device,
                dist_info: DistInfo = DistInfo()) -> Parts:
    mean, std = channel_stats(bundle.train.images)
    model_args = {**config.model_args, "num_classes": len(bundle.classes)}
    if config.image_size != 32:
        model_args["image_size"] = config.image_size
    model = create_model(config.model, **model_args).to(device, memory_format=memory_format(config))
    data_dependent_init(model, bundle, device, mean, std)
    train_model = wrap_distributed(model, config, dist_info, device)
    train_loader, eval_loader = make_loaders(bundle, config, device, mean, std, dist_info)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, len(train_loader))
    ema = WeightEMA(model, config.ema) if config.ema else None
    info = ModelInfo(config.model, model_args, bundle.classes, mean, std, config.image_size, config.to_dict())
    return Parts(model, train_model, ema, optimizer, scheduler, train_loader, eval_loader, info)


def run_training(config: TrainConfig, out: str | None = None, tensorboard: bool = False,
                 resume: str | None = None) -> Path:
    """Train as `config` says and write the run folder; returns its path.

    `tensorboard` also writes TensorBoard event files into the run folder (the optional extra).
    `resume` continues the run in that folder from its checkpoint.pt, with the run's own config.
    """
    try:
        with contextlib.ExitStack() as stack:  # the run folder's lock and the signal handlers, released on any exit
            return _run_training(config, out, tensorboard, resume, stack)
    except Exception as error:
        report_failure(env_info(), error)
        raise


def _open_checkpoint(resume: str, stack: contextlib.ExitStack) -> tuple[Path, dict]:
    """The run folder to resume and its checkpoint; rank 0 locks the folder.

    Under torchrun every rank reads the checkpoint itself (so the run folder must be on storage every
    node sees), before the process group forms: no rank can write a newer one while another still reads."""
    run_dir = Path(resume).expanduser()
    if run_dir.is_dir() and env_info().is_main:
        stack.enter_context(RunLock(run_dir))  # before reading: another process may be writing it
    return run_dir, load_checkpoint(run_dir)


def _start_processes(config: TrainConfig, stack: contextlib.ExitStack) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group if this process is one of its ranks; silence the other ranks."""
    dist_info, device = setup(pick_device(config.device))  # one process unless torchrun started this one
    stack.callback(teardown)
    if not dist_info.is_main:  # only rank 0 prints; errors still reach stderr
        stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    if dist_info.enabled and config.batch_size % dist_info.world:
        raise CifarlabError(f"--batch-size {config.batch_size}: the global batch must divide evenly over "
                            f"{dist_info.world} processes")
    return dist_info, device


def _run_training(config: TrainConfig, out: str | None, tensorboard: bool, resume: str | None,
                  stack: contextlib.ExitStack) -> Path:
    started = time.perf_counter()
    state = None
    if resume is not None:
        run_dir, state = _open_checkpoint(resume, stack)
        config = TrainConfig.from_dict(state["config"])
    config = config.validate()
    dist_info, device = _start_processes(config, stack)
    amp_dtype = autocast_dtype(device, config.precision)
    threads = set_cpu_threads(dist_info.local_world) if device.type == "cpu" else None
    seed_everything(config.seed)

    notes: list[str] = []
    bundle = load_data(config.data, config.dataset, config.val_split, config.seed, config.image_size, notes)
    for note in notes:
        print(note)
    if tensorboard:
        require_tensorboard()  # before the run folder exists: a missing package leaves nothing behind
    if state is None:
        run_dir = None
        if dist_info.is_main:  # rank 0 names and creates the folder; the other ranks learn its name
            run_dir = new_run_dir(out, config.recipe)  # only after the data loaded: a bad source leaves no folder
            stack.enter_context(RunLock(run_dir))
        run_dir = broadcast_path(run_dir)
    print(describe_data(bundle, config))
    print(f"device: {device_description(device)}, precision {amp_dtype or torch.float32}, run folder {run_dir}")
    if dist_info.enabled:
        print(f"distributed: {dist_info.world} processes ({torch.distributed.get_backend()}), "
              f"{config.batch_size // dist_info.world} images per process per step")

    parts = build_parts(config, bundle, device, dist_info)
    if dist_info.is_main:
        write_json(run_dir / "config.json", config.to_dict())
    first_epoch, resume_sums, done = 1, None, []
    if state is not None:
        if dist_info.is_main:
            remove_temporaries(run_dir)
        first_epoch, resume_sums, done = restore(state, parts.model, parts.optimizer, parts.scheduler,
                                                 parts.train_loader, device)
        if parts.ema is not None and state.get("ema") is not None:
            parts.ema.load_state_dict(state["ema"])  # the average so far, not a fresh copy of the restored weights
        print(f"resuming {run_dir} at epoch {first_epoch}, batch {resume_sums.batches if resume_sums else 0}"
              f"/{len(parts.train_loader)}")

    train_started = time.perf_counter()
    history, final_eval = _train_epochs(config, parts, run_dir, device, amp_dtype, dist_info, bundle.eval_split,
                                        stack, tensorboard, first_epoch, resume_sums, done)
    if not dist_info.is_main:  # the other ranks train and evaluate but write nothing
        return run_dir
    train_seconds = time.perf_counter() - train_started
    # this process's steps only: a resumed run's earlier steps were timed by the run that made them
    steps_run = (config.epochs - first_epoch + 1) * len(parts.train_loader) - (resume_sums.batches if resume_sums else 0)
    summary = write_results(run_dir, config, bundle, parts, history, final_eval, device, amp_dtype)
    summary.update({
        "wall_seconds": round(time.perf_counter() - started, 3), "train_seconds": round(train_seconds, 3),
        "images_per_second": round(steps_run * config.batch_size / train_seconds, 1),
        "device": device_description(device), "threads": threads, "processes": dist_info.world,
        "precision": str(amp_dtype or torch.float32), "versions": versions(),
    })
    write_json(run_dir / "summary.json", summary)
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # model.pt is the result; nothing is left to resume
    last, tta = history.records[-1], summary["tta"]
    final = f"{bundle.eval_split} accuracy {100 * last.val_acc:.2f}%" if last.val_acc is not None else "done"
    if tta is not None:
        final += f" ({100 * tta['accuracy']:.2f}% with test-time augmentation level {tta['level']})"
    print(f"{final} after {config.epochs} epochs in {summary['wall_seconds']:.1f}s; wrote {run_dir}")
    return run_dir


def _train_epochs(config: TrainConfig, parts: Parts, run_dir: Path, device: torch.device,
                  amp_dtype: torch.dtype | None, dist_info: DistInfo, split: str | None, stack: contextlib.ExitStack,
                  tensorboard: bool, first_epoch: int, resume_sums,
                  done: list[EpochRecord]) -> tuple[History, EvalResult | None]:
    """The epochs from `first_epoch` on; rank 0 logs, checkpoints and stops cleanly on a signal.

    Returns the history (`done`, the records a resumed run already had, then these) and the last
    epoch's evaluation (None when no epoch ran or nothing is evaluated)."""
    main = dist_info.is_main
    history = History(list(done))
    # other ranks: no live bar (their stdout, /dev/null by now, is no terminal)
    progress = EpochProgress(config.epochs, len(parts.train_loader), split, bar_stream=None if main else sys.stdout)
    metrics = MetricsWriter(run_dir / "metrics.csv") if main else None
    for record in history.records if main else []:  # a resumed run rewrites its checkpoint's rows (a later one may be half-written)
        metrics.write(record)
    # the other ranks keep the default SIGTERM: torchrun's agent ends them with it when a rank fails
    stop = stack.enter_context(StopSignals()) if main else StopSignals()
    saver = (Checkpointer(run_dir, config, parts.model, parts.optimizer, parts.scheduler, parts.train_loader,
                          history, parts.ema) if main else None)
    board = TensorBoardLog(run_dir) if tensorboard and main else None

    def on_step(epoch: int, sums) -> None:
        if parts.ema is not None:
            parts.ema.update(parts.model)
        if saver is not None:
            saver.on_step(epoch, sums, stop.requested)

    last_eval: EvalResult | None = None  # the last epoch's evaluation, for the views (no second pass)

    def keep_last(result: EvalResult) -> None:
        nonlocal last_eval
        last_eval = result
    try:
        if first_epoch <= config.epochs:  # a run resumed after its last epoch only writes its files
            progress.start_epoch(first_epoch)
        for record in fit_epochs(parts.train_model, parts.optimizer, config.epochs, device, parts.train_loader,
                                 parts.eval_loader, scheduler=parts.scheduler, amp_dtype=amp_dtype,
                                 label_smoothing=config.label_smoothing, clip_grad=config.clip_grad,
                                 eval_model=parts.final_model, on_batch=progress.on_batch,
                                 on_eval=keep_last,
                                 first_epoch=first_epoch, resume_sums=resume_sums, on_step=on_step):
            if dist_info.enabled:  # each rank's training means cover its own shard: report their mean
                record.train_loss, record.train_acc = all_reduce_mean([record.train_loss, record.train_acc], device)
            progress.end_epoch(record)
            history.records.append(record)
            if not main:
                continue
            metrics.write(record)
            if board is not None:
                board.write(record)
            saver.end_epoch(record, stop.requested)
            if record.epoch < config.epochs:
                progress.start_epoch(record.epoch + 1)
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory(device, config) from None
    finally:
        if metrics is not None:
            metrics.close()
        if board is not None:
            board.close()
    stop.restore()  # the run's files are written next: Ctrl-C interrupts them as usual
    return history, last_eval


def write_results(run_dir: Path, config: TrainConfig, bundle: DataBundle, parts: Parts, history: History,
                  final_eval: EvalResult | None, device: torch.device, amp_dtype: torch.dtype | None) -> dict:
    """model.pt, curves.png and the evaluation views; returns the summary's accuracy figures."""
    save_model(run_dir / MODEL_FILE, parts.final_model, parts.info)
    save_curves(history, config.epochs, run_dir / "curves.png")
    split = bundle.eval_split
    if final_eval is None and parts.eval_loader is not None:  # resumed after its last epoch: predict again
        final_eval = evaluate(parts.final_model, parts.eval_loader, device, amp_dtype)
    if final_eval is not None:  # the views `eval --out` writes
        write_eval_views(run_dir / EVAL_DIR, final_eval, bundle.split(split).images, bundle.classes,
                         {"split": split, "data": bundle.source})
    last = history.records[-1]
    # test-time augmentation once, on the final weights: epochs are compared without it (cheaper, and
    # what `eval` reports by default); the recipe's headline figure is this one (`eval --tta N`)
    tta = (evaluate(parts.final_model, parts.eval_loader, device, amp_dtype, config.tta)
           if config.tta and parts.eval_loader is not None else None)
    return {
        "recipe": config.recipe, "model": config.model, "eval_split": split,
        "accuracy": last.val_acc, "loss": last.val_loss, "train_accuracy": last.train_acc,
        "tta": {"level": config.tta, "accuracy": tta.accuracy, "loss": tta.loss} if tta is not None else None,
        "epochs": config.epochs, "train_images": len(bundle.train),
        "eval_images": len(bundle.split(split)) if split else 0,
    }
