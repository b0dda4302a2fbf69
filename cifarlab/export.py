"""Export a trained model for use outside cifarlab: ONNX, TorchScript or safetensors, each checked.

ONNX and TorchScript files hold the whole inference path: they take float32 RGB images in 0..1,
NCHW, at the training resolution, normalise them with the training mean and std, and return
log-probabilities [N, classes]. safetensors holds weights only (it is a tensor format, not a program):
its metadata names the model and its arguments, the classes, mean, std and image size, so
`create_model(name, **args)` rebuilds it and the caller normalises.

Every export is read back by its own runtime (onnxruntime, torch.jit.load, safetensors.load_file) and
compared with the PyTorch model on the same random images; a difference above the format's tolerance
deletes the file and fails. The export is written to a temporary name and renamed, so a failed export
leaves nothing behind.
"""
from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cifarlab.rundir import ModelInfo, atomic_file, load_model, resolve_model_path
from cifarlab.errors import CifarlabError, unknown_name
from cifarlab.models import create_model

CHECK_IMAGES = 8  # random 0..1 images the export is compared on


class NormalizedModel(nn.Module):
    """0..1 RGB images in, log-probabilities out: the normalisation travels with the exported model."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # log_softmax of a model that already ends in log-softmax changes nothing; of logits, it
        # makes the output log-probabilities either way
        return self.model((images - self.mean) / self.std).log_softmax(dim=1)


def metadata(info: ModelInfo) -> dict[str, str]:
    """String -> string, as ONNX metadata_props, safetensors headers and TorchScript extra files take."""
    return {"cifarlab.model": info.name, "cifarlab.model_args": json.dumps(info.args),
            "cifarlab.classes": json.dumps(info.classes), "cifarlab.mean": json.dumps(info.mean),
            "cifarlab.std": json.dumps(info.std), "cifarlab.image_size": str(info.image_size)}


def _need(module: str, extra: str = "export"):
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise CifarlabError(f"export: the '{package}' package is not installed "
                            f"(pip install 'cifarlab[{extra}]' or pip install {package})") from None


# --- writers: (wrapped model, ModelInfo, example input, path) -> None ------------------------------

def _write_onnx(wrapped: NormalizedModel, info: ModelInfo, example: torch.Tensor, path: Path) -> None:
    onnx = _need("onnx")
    _need("onnxscript")  # torch's ONNX exporter (torch.export-based, the default since torch 2.9) needs it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (example,), str(path), input_names=["images"], output_names=["log_probs"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True, verbose=False,
                          external_data=False)  # one self-contained file
    proto = onnx.load(str(path))
    for key, value in metadata(info).items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))


def _write_torchscript(wrapped: NormalizedModel, info: ModelInfo, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is in maintenance mode and says so
        traced = torch.jit.trace(wrapped, example)
        torch.jit.save(traced, str(path), _extra_files={"cifarlab.json": json.dumps(metadata(info))})


def _write_safetensors(wrapped: NormalizedModel, info: ModelInfo, example: torch.Tensor, path: Path) -> None:
    safetensors_torch = _need("safetensors.torch")
    state = {k: v.detach().cpu().contiguous() for k, v in wrapped.model.state_dict().items()}
    safetensors_torch.save_file(state, str(path), metadata=metadata(info))


# --- runners: (path, ModelInfo, images 0..1) -> log-probabilities, each through its own runtime --------

def _run_onnx(path: Path, info: ModelInfo, images: torch.Tensor) -> torch.Tensor:
    ort = _need("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def _run_torchscript(path: Path, info: ModelInfo, images: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location="cpu")(images)


def _run_safetensors(path: Path, info: ModelInfo, images: torch.Tensor) -> torch.Tensor:
    safetensors_torch = _need("safetensors.torch")
    with open(path, "rb") as f:  # rebuild from the file's own metadata, as a user without model.pt would
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    model = create_model(header["cifarlab.model"], **json.loads(header["cifarlab.model_args"]))
    model.load_state_dict(safetensors_torch.load_file(str(path)))
    mean, std = (torch.tensor(json.loads(header[k])).view(1, 3, 1, 1) for k in ("cifarlab.mean", "cifarlab.std"))
    return model.eval()((images - mean) / std).log_softmax(dim=1)


@dataclass(frozen=True)
class Format:
    suffix: str
    write: Callable[[NormalizedModel, ModelInfo, torch.Tensor, Path], None]
    run: Callable[[Path, ModelInfo, torch.Tensor], torch.Tensor]
    tolerance: float  # max absolute difference in log-probabilities from the PyTorch model


FORMATS: dict[str, Format] = {
    # onnxruntime fuses and reorders float ops (its own conv kernels): rounding differs, ~1e-6 seen
    "onnx": Format(".onnx", _write_onnx, _run_onnx, 1e-4),
    # the same PyTorch kernels run the traced graph
    "torchscript": Format(".pt", _write_torchscript, _run_torchscript, 1e-5),
    # the same weights in the same model: only the normalisation is done outside the graph
    "safetensors": Format(".safetensors", _write_safetensors, _run_safetensors, 1e-5),
}


def default_path(model_path: Path, fmt: str) -> Path:
    """RUN_DIR/model.onnx for a run folder; beside the checkpoint, same stem, for a file."""
    checkpoint = resolve_model_path(model_path)
    suffix = ".ts.pt" if fmt == "torchscript" else FORMATS[fmt].suffix  # never model.pt itself
    return checkpoint.with_name(checkpoint.stem + suffix)


@torch.no_grad()
def export_model(model_path: Path, fmt: str, out: Path | None = None, seed: int = 0) -> dict:
    """Write the export and check it; returns path, format, max_abs_diff and tolerance."""
    if fmt not in FORMATS:
        raise unknown_name("export format", fmt, list(FORMATS))
    spec = FORMATS[fmt]
    model, info = load_model(model_path, torch.device("cpu"))
    wrapped = NormalizedModel(model.float(), info.mean, info.std).eval()
    images = torch.rand(CHECK_IMAGES, 3, info.image_size, info.image_size,
                        generator=torch.Generator().manual_seed(seed))
    path = Path(out) if out is not None else default_path(model_path, fmt)
    if path.exists() and path.resolve() == resolve_model_path(model_path).resolve():
        raise CifarlabError(f"--out {path}: that is the checkpoint being exported")
    with atomic_file(path) as tmp:  # checked before it takes the name: a failed check leaves nothing
        spec.write(wrapped, info, images[:2], tmp)
        difference = float((spec.run(tmp, info, images) - wrapped(images)).abs().max())
        if not difference <= spec.tolerance:  # `not <=` also catches NaN
            raise CifarlabError(f"export {fmt}: outputs differ from the PyTorch model by {difference:.3g} "
                                f"(tolerance {spec.tolerance:g}); nothing written")
    return {"path": str(path), "format": fmt, "max_abs_diff": difference, "tolerance": spec.tolerance,
            "checked_images": CHECK_IMAGES, "input": f"float32 RGB 0..1 [N, 3, {info.image_size}, {info.image_size}]"
            + (" (normalise first: see metadata)" if fmt == "safetensors" else ""),
            "output": f"log-probabilities [N, {len(info.classes)}]"}
