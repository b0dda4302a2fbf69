"""Using a trained model outside training: `predict` on real image files, and exports checked against PyTorch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.rundir import ModelInfo, load_model, save_model
from cifarlab.cli import main
from cifarlab.data import TensorLoader, load_data
from cifarlab.device import autocast_dtype
from cifarlab.engine import evaluate
from cifarlab.models import create_model

# stated tolerances: max absolute difference in log-probabilities from the PyTorch model on the same images
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-5, "safetensors": 1e-5}


def _copy_subset(source: Path, target: Path, start: int, stop: int) -> list[Path]:
    """Images start..stop-1 (in file order) of every class folder under source, copied to target/<class>/."""
    copied = []
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        (target / class_dir.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(class_dir.iterdir())[start:stop]:
            copied.append(Path(shutil.copy(path, target / class_dir.name / path.name)))
    return copied


@pytest.fixture(scope="module")
def real_run(shared_images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1-epoch model trained on 300 real images, and a folder of 200 other real images to label."""
    root = tmp_path_factory.mktemp("predict")
    _copy_subset(shared_images, root / "train", 0, 30)
    _copy_subset(shared_images, root / "unseen", 30, 50)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFARLAB_CACHE", str(root / "cache"))
        assert main(["train", "--data", str(root / "train"), "--epochs", "1", "--batch-size", "32",
                     "--val-split", "50", "--lr", "2e-3", "--out", str(root / "run")]) == 0
    return root / "run", root / "unseen"


def test_predict_labels_real_images_as_eval_does(real_run, capsys) -> None:
    run, unseen = real_run
    files = sorted(unseen.rglob("*.jpg"))  # class folders sorted, files sorted: the order a source is read in
    assert len(files) == 200
    assert main(["predict", str(run), *map(str, files), "--json", "--top-k", "3"]) == 0
    results = json.loads(capsys.readouterr().out)

    model, info = load_model(run)
    bundle = load_data(str(unseen), val_split=0)  # the same files as a data source, evaluated whole
    cpu = torch.device("cpu")  # in the precision the run trained in, as predict and eval use it
    expected = evaluate(model, TensorLoader(bundle.train, 64, cpu, (info.mean, info.std)), cpu,
                        autocast_dtype(cpu, info.config["precision"]))
    assert [r["label"] for r in results] == [info.classes[i] for i in expected.predictions]
    probabilities = torch.tensor([r["probability"] for r in results])
    assert torch.allclose(probabilities, expected.probabilities.max(dim=1).values, atol=1e-5)
    truth = [f.parent.name for f in files]
    accuracy = np.mean([r["label"] == t for r, t in zip(results, truth)])
    assert accuracy == pytest.approx(expected.accuracy)  # predict is as accurate as eval on the same images
    assert main(["eval", str(run), "--data", str(unseen), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(accuracy)

    first = results[0]
    assert set(first) == {"path", "label", "probability", "topk"} and first["path"] == str(files[0])
    assert [t["label"] for t in first["topk"]][0] == first["label"] and len(first["topk"]) == 3
    assert first["topk"][0]["probability"] >= first["topk"][1]["probability"] >= first["topk"][2]["probability"]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """An untrained model saved as a run folder would hold it (weights need not be good to compare outputs)."""
    torch.manual_seed(0)
    model = create_model("cifar10_cnn", channels=[8, 8, 16, 16], hidden=32, num_classes=4)
    info = ModelInfo("cifar10_cnn", {"channels": [8, 8, 16, 16], "hidden": 32, "num_classes": 4},
                     ["ant", "bee", "cow", "dog"], [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], 32, {})
    save_model(tmp_path / "run" / "model.pt", model, info)
    return tmp_path / "run"


def test_predict_takes_images_of_any_size_and_mode(checkpoint: Path, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    paths = {"big.png": Image.fromarray(rng.integers(0, 256, (48, 64, 4), dtype=np.uint8), "RGBA"),
             "grey.jpg": Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L"),
             "palette.gif": Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("P")}
    for name, image in paths.items():
        image.save(tmp_path / name)
    files = [str(tmp_path / name) for name in paths]
    assert main(["predict", str(checkpoint / "model.pt"), *files, "--json", "--top-k", "10"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results] == files
    for r in results:
        assert len(r["topk"]) == 4 and sum(t["probability"] for t in r["topk"]) == pytest.approx(1, abs=1e-5)
    assert main(["predict", str(checkpoint), *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith(files[0]) and "%" in lines[0]


def test_predict_of_a_missing_file_is_one_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert main(["predict", str(checkpoint), str(tmp_path / "nope.png")]) == 2
    assert "nope.png: no such image file" in capsys.readouterr().err


def _run_export(fmt: str, path: Path, images: torch.Tensor) -> torch.Tensor:
    """Log-probabilities from the exported file, through its own runtime, with no cifarlab code involved."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    if fmt == "torchscript":
        return torch.jit.load(str(path))(images)
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    model = create_model(meta["cifarlab.model"], **json.loads(meta["cifarlab.model_args"]))
    model.load_state_dict(load_file(str(path)))
    mean = torch.tensor(json.loads(meta["cifarlab.mean"])).view(1, 3, 1, 1)
    std = torch.tensor(json.loads(meta["cifarlab.std"])).view(1, 3, 1, 1)
    return model.eval()((images - mean) / std)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors", "torchscript"])
def test_export_matches_the_pytorch_model(fmt: str, checkpoint: Path, capsys) -> None:
    assert main(["export", str(checkpoint), "--format", fmt]) == 0
    printed = capsys.readouterr().out
    assert f"tolerance {TOLERANCE[fmt]:g}" in printed
    path = Path(printed.split()[1])
    assert path.parent == checkpoint and path.exists() and path.name != "model.pt"
    assert [p.name for p in checkpoint.iterdir() if p.name.startswith(".")] == []  # no temporary left over

    model, info = load_model(checkpoint)
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # 0..1 RGB, a new batch
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (info.mean, info.std))
    with torch.no_grad():
        expected = model((images - mean) / std)
        got = _run_export(fmt, path, images)
    assert got.shape == (16, 4)
    assert (got - expected).abs().max().item() <= TOLERANCE[fmt]
