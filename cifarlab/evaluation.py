"""Evaluate a saved model on a data split (what `cifarlab eval` prints), and the evaluation views
(eval.json and its pictures) that `eval --out` and the end of `train` both write, so the two agree."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from cifarlab.config import TrainConfig
from cifarlab.data import DataBundle, ImageSet, TensorLoader, load_data
from cifarlab.device import autocast_dtype, open_device
from cifarlab.engine import evaluate
from cifarlab.errors import CifarlabError
from cifarlab.metrics import summarize
from cifarlab.plots import draw_confusion_matrix, draw_reliability, draw_worst_mistakes
from cifarlab.records import EvalResult
from cifarlab.rundir import EVAL_JSON, load_model, resolve_model_path, save_figure, write_json

TTA_VIEWS = {1: 2, 2: 6}  # --tta level -> views averaged (the image and its mirror; plus 1-px shifts)


def evaluate_model(model_path: Path, data: str | None = None, dataset: str | None = None,
                   split: str | None = None, device: str = "auto", tta: int | None = None,
                   out: Path | None = None, memory_fraction: float | None = None) -> dict:
    """Accuracy, loss and per-class accuracy of a run folder's or checkpoint's model on a split.

    Without `data`/`dataset` the run's own source is used, with its validation split and seed, so
    `--split val` is exactly the held-out set the run reported on. `tta` 1 or 2 evaluates a second
    time with test-time augmentation and reports both accuracies and the gain; None means the run's
    own level (so `eval` reports what `train` printed), 0 none. `out` writes the evaluation views (of
    the TTA predictions when there are some) and eval.json there.
    """
    torch_device = open_device(device, memory_fraction)
    model, info = load_model(model_path, torch_device)
    bundle = _run_source(info.config, data, dataset, info.image_size)
    if bundle.classes != info.classes:
        raise CifarlabError(f"{bundle.source}: its classes {bundle.classes} do not match the model's {info.classes}")
    split = split or bundle.eval_split or "train"
    images = bundle.split(split)
    loader = TensorLoader(images, TrainConfig.eval_batch_size, torch_device, (info.mean, info.std))
    amp_dtype = autocast_dtype(torch_device, info.config.get("precision", "auto"))
    result = evaluate(model, loader, torch_device, amp_dtype)
    level = info.config.get("tta", 0) if tta is None else tta
    report = {
        "model": str(resolve_model_path(model_path)), "data": bundle.source, "split": split,
        "accuracy": result.accuracy, "loss": result.loss, "n": result.n,
        "correct": int((result.predictions == result.targets).sum()), "tta_level": level,
        "per_class_accuracy": dict(zip(info.classes, result.per_class_accuracy(len(info.classes)))),
    }
    viewed = result
    if level:
        viewed = evaluate(model, loader, torch_device, amp_dtype, tta=level, plain=result,
                          tta_share=info.config.get("tta_share", 1.0))
        report["tta"] = {"views": TTA_VIEWS[level], "accuracy": viewed.accuracy, "loss": viewed.loss,
                         "gain": viewed.accuracy - result.accuracy}
    if out is not None:
        extra = {key: report[key] for key in ("model", "data", "split")}
        extra["tta"] = report.get("tta")
        views = write_eval_views(Path(out), viewed, info.classes, extra, images.images)
        report.update(out=str(out), ece=views["ece"],
                      per_class={name: {"precision": v["precision"], "recall": v["recall"]}
                                 for name, v in views["per_class"].items()})
    return report


def _run_source(config: dict, data: str | None, dataset: str | None, image_size: int) -> DataBundle:
    """The run's own source (left out, or named again) split exactly as in training; another source
    evaluated whole (or on its test split)."""
    # the same file however it is spelled (config.json keeps the absolute path as typed, `..` and links
    # included): compared as spelled, `/work/shared/x` was another source than `/work/main/../shared/x`, and
    # the run was evaluated on all its training images
    own_source = ((data is None and dataset is None) or (dataset is not None and dataset == config.get("dataset"))
                  or (data is not None and config.get("data") is not None
                      and Path(data).expanduser().resolve() == Path(config["data"]).resolve()))
    if own_source:
        data, dataset = config.get("data"), config.get("dataset")
    return load_data(data, dataset, config.get("val_split") if own_source else 0, config.get("seed", 0), image_size)


# file name -> how to draw it from (summary, images, classes); `images` is a callable that returns the
# evaluated images (loader order), called only by the picture that shows them. One table, no if/elif chain
EVAL_VIEWS: dict[str, Callable[[dict, Callable[[], torch.Tensor], list[str]], object]] = {
    "confusion_matrix.png": lambda s, images, classes: draw_confusion_matrix(s["confusion_matrix"], classes),
    "worst_mistakes.png": lambda s, images, classes: draw_worst_mistakes(images(), s["worst_mistakes"]),
    "reliability.png": lambda s, images, classes: draw_reliability(s["calibration_bins"], s["ece"]),
}


def write_eval_views(out_dir: Path, result: EvalResult, classes: list[str], extra: dict | None = None,
                     images: torch.Tensor | None = None) -> dict:
    """Write eval.json for `result` into out_dir and, given the evaluated `images` (in loader order), the
    pictures too (`eval --out`). `train` writes the numbers only: drawing takes 1-2 s at the end of every
    run, which `report` pays instead, from eval.json, when someone looks.

    `extra` (split, data, TTA figures...) is merged into eval.json. Returns what eval.json holds.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {**(extra or {}), "loss": result.loss,
               **summarize(result.predictions, result.targets, result.probabilities, classes)}
    if images is not None:
        for name, draw in EVAL_VIEWS.items():
            save_figure(draw(summary, images.cpu, classes), out_dir / name)
    write_json(out_dir / EVAL_JSON, summary)
    return summary


def run_images(config: dict, split: str) -> torch.Tensor:
    """The images of a run's `split` (uint8), from its own source split as in training: the tiles of
    worst_mistakes.png when `report` draws it from eval.json."""
    return run_split(config, split).images


def run_split(config: dict, split: str | None = None) -> ImageSet:
    """A run's `split` (images and labels; None: the split it reported on) from its own source, split as
    in training."""
    bundle = _run_source(config, None, None, config.get("image_size", 32))
    return bundle.split(split or bundle.eval_split or "train")
