"""Evaluate a saved model on a data split: what `cifarlab eval` prints."""
from __future__ import annotations

from pathlib import Path

from cifarlab.checkpoint import load_model, resolve_model_path
from cifarlab.data import TensorLoader, load_data
from cifarlab.device import autocast_dtype, pick_device, set_cpu_threads
from cifarlab.engine import evaluate
from cifarlab.errors import CifarlabError


def evaluate_model(model_path: Path, data: str | None = None, dataset: str | None = None,
                   split: str | None = None, device: str = "auto", batch_size: int = 1000) -> dict:
    """Accuracy, loss and per-class accuracy of a run folder's or checkpoint's model on a split.

    Without `data`/`dataset` the run's own source is used, with its validation split and seed, so
    `--split val` is exactly the held-out set the run reported on.
    """
    torch_device = pick_device(device)
    if torch_device.type == "cpu":
        set_cpu_threads()
    model, info = load_model(model_path, torch_device)
    config = info.config
    own_source = data is None and dataset is None
    if own_source:
        data, dataset = config.get("data"), config.get("dataset")
    # the run's own source is split as in training; another source is evaluated whole (or its test split)
    bundle = load_data(data, dataset, config.get("val_split") if own_source else 0, config.get("seed", 0),
                       info.image_size)
    if bundle.classes != info.classes:
        raise CifarlabError(f"{bundle.source}: its classes {bundle.classes} do not match the model's {info.classes}")
    split = split or bundle.eval_split or "train"
    images = bundle.split(split)
    loader = TensorLoader(images, batch_size, torch_device, info.mean, info.std)
    result = evaluate(model, loader, torch_device, autocast_dtype(torch_device, config.get("precision", "auto")))
    per_class = result.per_class_accuracy(len(info.classes))
    return {
        "model": str(resolve_model_path(model_path)), "data": bundle.source, "split": split,
        "accuracy": result.accuracy, "loss": result.loss, "n": result.n,
        "correct": int((result.predictions == result.targets).sum()),
        "per_class_accuracy": dict(zip(info.classes, per_class)),
    }
