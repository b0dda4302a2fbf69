"""Label image files with a trained model: top-k classes and their probabilities (`cifarlab predict`).

Images go through exactly the path training and `eval` use: the same decoder (RGB, resized to the
model's training resolution), the same loader normalisation and the same forward pass, so a file
gets the label `eval` gives it inside a data source.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cifarlab.rundir import load_model
from cifarlab.data import ImageSet, TensorLoader
from cifarlab.data.sources import decode_image  # one decoding rule for training, eval and predict
from cifarlab.device import autocast, autocast_dtype, open_device
from cifarlab.engine import tta_log_probs
from cifarlab.errors import CifarlabError


def read_images(paths: list[Path], size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size] from image files of any size or mode."""
    arrays = []
    for path in paths:
        if not path.is_file():
            raise CifarlabError(f"{path}: no such image file")
        array, _ = decode_image(path.read_bytes(), size, str(path))
        arrays.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
    return torch.stack(arrays)


@torch.no_grad()
def predict_files(model_path: Path, paths: list[Path], top_k: int = 3, device: str = "auto",
                  batch_size: int = 256, tta: int = 0, memory_fraction: float | None = None) -> list[dict]:
    """One dict per image: path, label (top class), probability, and topk [{label, probability}]."""
    if not paths:
        raise CifarlabError("predict: give one or more image files")
    torch_device = open_device(device, memory_fraction)
    model, info = load_model(model_path, torch_device)
    images = read_images(paths, info.image_size)
    k = max(1, min(top_k, len(info.classes)))
    dummy = ImageSet(images, torch.zeros(len(images), dtype=torch.int64), info.classes)
    amp_dtype = autocast_dtype(torch_device, info.config.get("precision", "auto"))  # as eval runs it
    with autocast(torch_device, amp_dtype):
        log_probs = torch.cat([tta_log_probs(model, batch, tta).float().cpu()
                               for batch, _ in TensorLoader(dummy, batch_size, torch_device, (info.mean, info.std))])
    top_p, top_i = log_probs.exp().topk(k, dim=1)
    results = []
    for path, probs, index in zip(paths, top_p.tolist(), top_i.tolist()):
        topk = [{"label": info.classes[i], "probability": p} for p, i in zip(probs, index)]
        results.append({"path": str(path), "label": topk[0]["label"], "probability": topk[0]["probability"],
                        "topk": topk})
    return results


def format_predictions(results: list[dict]) -> str:
    """One line per image: the path, then label (probability) for each of the top k."""
    width = max(len(r["path"]) for r in results)
    return "\n".join(f"{r['path']:<{width}}  " + "  ".join(f"{t['label']} {100 * t['probability']:.1f}%"
                                                          for t in r["topk"]) for r in results)
