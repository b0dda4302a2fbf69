"""One training run end to end: config -> data -> model -> epochs -> run folder.

This is what `cifarlab train` calls; the notebook-style API lives in `engine` and works without it.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from cifarlab.checkpoint import MODEL_FILE, ModelInfo, save_model
from cifarlab.config import TrainConfig
from cifarlab.data import Augment, DataBundle, TensorLoader, channel_stats, load_data
from cifarlab.device import autocast_dtype, pick_device, set_cpu_threads
from cifarlab.engine import History, fit_epochs
from cifarlab.models import create_model
from cifarlab.optim import build_optimizer, build_scheduler
from cifarlab.plots import save_curves
from cifarlab.progress import EpochProgress
from cifarlab.runs import MetricsWriter, device_description, new_run_dir, versions, write_json


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
                 std: list[float]) -> tuple[TensorLoader, TensorLoader | None]:
    augment = Augment(translate=config.translate, flip=config.flip) if (config.translate or config.flip) else None
    train_loader = TensorLoader(bundle.train, config.batch_size, device, mean, std, shuffle=True, augment=augment,
                                drop_last=len(bundle.train) > config.batch_size, seed=config.seed)
    split = bundle.eval_split
    eval_loader = (TensorLoader(bundle.split(split), config.eval_batch_size, device, mean, std)
                   if split is not None else None)
    return train_loader, eval_loader


def run_training(config: TrainConfig, out: str | None = None) -> Path:
    """Train as `config` says and write the run folder; returns its path."""
    started = time.perf_counter()
    config = config.validate()
    device = pick_device(config.device)
    amp_dtype = autocast_dtype(device, config.precision)
    threads = set_cpu_threads() if device.type == "cpu" else None
    seed_everything(config.seed)

    notes: list[str] = []
    bundle = load_data(config.data, config.dataset, config.val_split, config.seed, config.image_size, notes)
    for note in notes:
        print(note)
    run_dir = new_run_dir(out, config.recipe)  # only after the data loaded: a bad source leaves no folder
    print(describe_data(bundle, config))
    print(f"device: {device_description(device)}, precision {amp_dtype or torch.float32}, run folder {run_dir}")

    mean, std = channel_stats(bundle.train.images)
    model_args = {**config.model_args, "num_classes": len(bundle.classes)}
    if config.image_size != 32:
        model_args["image_size"] = config.image_size
    model = create_model(config.model, **model_args).to(device, memory_format=torch.channels_last)
    train_loader, eval_loader = make_loaders(bundle, config, device, mean, std)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, len(train_loader))
    write_json(run_dir / "config.json", config.to_dict())

    split = bundle.eval_split
    progress = EpochProgress(config.epochs, len(train_loader), split)
    metrics = MetricsWriter(run_dir / "metrics.csv")
    history = History()
    train_started = time.perf_counter()
    try:
        progress.start_epoch(1)
        for record in fit_epochs(model, optimizer, config.epochs, device, train_loader, eval_loader,
                                 scheduler=scheduler, amp_dtype=amp_dtype, label_smoothing=config.label_smoothing,
                                 on_batch=progress.on_batch):
            progress.end_epoch(record)
            history.records.append(record)
            metrics.write(record)
            if record.epoch < config.epochs:
                progress.start_epoch(record.epoch + 1)
    finally:
        metrics.close()
    train_seconds = time.perf_counter() - train_started

    info = ModelInfo(config.model, model_args, bundle.classes, mean, std, config.image_size, config.to_dict())
    save_model(run_dir / MODEL_FILE, model, info)
    save_curves(history, config.epochs, run_dir / "curves.png")
    last = history.records[-1]
    summary = {
        "recipe": config.recipe, "model": config.model, "eval_split": split,
        "accuracy": last.val_acc, "loss": last.val_loss, "train_accuracy": last.train_acc,
        "epochs": config.epochs, "train_images": len(bundle.train),
        "eval_images": len(bundle.split(split)) if split else 0,
        "wall_seconds": round(time.perf_counter() - started, 3), "train_seconds": round(train_seconds, 3),
        "images_per_second": round(config.epochs * len(train_loader) * config.batch_size / train_seconds, 1),
        "device": device_description(device), "threads": threads, "precision": str(amp_dtype or torch.float32),
        "versions": versions(),
    }
    write_json(run_dir / "summary.json", summary)
    final = f"{split} accuracy {100 * last.val_acc:.2f}%" if last.val_acc is not None else "done"
    print(f"{final} after {config.epochs} epochs in {summary['wall_seconds']:.1f}s; wrote {run_dir}")
    return run_dir
