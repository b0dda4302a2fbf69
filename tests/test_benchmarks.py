"""What the benchmarks write for other tools is in the layout those tools read."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_airbench_gets_our_split_in_its_own_layout(tmp_path: Path, image_folder_writer) -> None:
    """airbench's CifarLoader reads {'images': uint8 [N, 32, 32, 3], 'labels', 'classes'} (NHWC)."""
    image_folder_writer(tmp_path / "images", {name: 10 for name in ("cat", "dog")})
    _load("vs_airbench").write_airbench_data(str(tmp_path / "images"), 4, tmp_path / "cifar10")
    train = torch.load(tmp_path / "cifar10" / "train.pt", weights_only=True)
    test = torch.load(tmp_path / "cifar10" / "test.pt", weights_only=True)
    assert train["images"].shape == (16, 32, 32, 3) and train["images"].dtype == torch.uint8
    assert test["images"].shape == (4, 32, 32, 3) and test["labels"].tolist() == [0, 0, 1, 1]
    assert train["classes"] == ["cat", "dog"]


def test_the_half_factorial_sweep_is_balanced_and_keeps_pairs_apart() -> None:
    """sweep.py's half fraction of 5 options: 16 distinct configurations, each option on in half of them,
    and every pair of options in all four on/off combinations equally often (so a main effect is not
    mixed with another option's, nor with a pair's interaction)."""
    import itertools

    designs = _load("sweep").designs
    half = designs(5, half=True)
    assert len(half) == len(set(half)) == 16
    for k in range(5):
        assert sum(levels[k] for levels in half) == 8
    for a, b in itertools.combinations(range(5), 2):
        assert all(sum((lv[a], lv[b]) == pair for lv in half) == 4 for pair in itertools.product((0, 1), repeat=2))
    assert len(designs(3, half=False)) == 8
