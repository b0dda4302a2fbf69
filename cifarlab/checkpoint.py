"""Model files: a plain dict of tensors and JSON-compatible values, written atomically, read safely.

`model.pt` holds everything `eval` and `predict` need (model name and arguments, class names,
normalisation, image size, the run's config), so a checkpoint works without its run folder. It is
read with `torch.load(weights_only=True)`, which refuses any pickle that would build arbitrary
objects: a checkpoint from a stranger cannot run code.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cifarlab.data.cache import atomic_torch_save
from cifarlab.errors import CifarlabError
from cifarlab.models import create_model

MODEL_FORMAT = "cifarlab.model/1"
MODEL_FILE = "model.pt"


@dataclass
class ModelInfo:
    name: str
    args: dict
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_size: int
    config: dict  # the run's TrainConfig as a dict


def save_model(path: Path, model: nn.Module, info: ModelInfo) -> None:
    atomic_torch_save({
        "format": MODEL_FORMAT, "model": info.name, "model_args": info.args, "classes": info.classes,
        "mean": info.mean, "std": info.std, "image_size": info.image_size, "config": info.config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }, path)


def safe_load(path: Path) -> object:
    """torch.load with weights_only=True: tensors and plain values only. A pickle that would build
    any other object (and so could run code) is refused before anything is built."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CifarlabError(f"{path}: refused to load: it holds objects other than tensors and plain values, "
                            f"which could run code ({_first_line(error, prefer='global')})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CifarlabError(f"{path}: corrupt or truncated checkpoint ({_first_line(error)})") from None


def _first_line(error: BaseException, prefer: str = "") -> str:
    """One line of a long message; with `prefer`, the first line naming it (torch's refusal names the
    blocked global on a later line, after advice to turn the check off, which we do not repeat)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    chosen = next((line for line in lines if prefer and prefer.lower() in line.lower()), lines[0])
    return chosen[:200]


def resolve_model_path(path: Path) -> Path:
    """A run folder means its model.pt; a file is taken as it is."""
    if path.is_dir():
        path = path / MODEL_FILE
        if not path.exists():
            raise CifarlabError(f"{path.parent}: not a run folder (no {MODEL_FILE}; did the run finish?)")
    elif not path.exists():
        raise CifarlabError(f"{path}: no such run folder or checkpoint")
    return path


def load_model(path: Path, device: torch.device = torch.device("cpu")) -> tuple[nn.Module, ModelInfo]:
    """The model (weights loaded, on `device`, in eval mode) and what it was trained on."""
    path = resolve_model_path(path)
    data = safe_load(path)
    if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
        raise CifarlabError(f"{path}: not a cifarlab model file (expected format {MODEL_FORMAT})")
    info = ModelInfo(data["model"], dict(data["model_args"]), list(data["classes"]), list(data["mean"]),
                     list(data["std"]), int(data["image_size"]), dict(data["config"]))
    model = create_model(info.name, **info.args)
    try:
        model.load_state_dict(data["state_dict"])
    except RuntimeError as error:
        raise CifarlabError(f"{path}: weights do not fit model '{info.name}' ({str(error).splitlines()[0]})") from None
    return model.to(device).eval(), info
