"""--progressive-resize: which size each epoch trains at, what the steps cost, and that a run follows it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cifarlab.build import epoch_image_size, mean_step_cost, step_costs
from cifarlab.cli import main
from cifarlab.config import TrainConfig, recipe
from cifarlab.data import ImageSet, TensorLoader

TINY = ["--model", "resnet20", "--batch-size", "8", "--val-split", "12", "--seed", "1", "--device", "cpu"]


def test_each_epoch_trains_at_the_size_where_its_first_step_falls() -> None:
    config = dataclasses.replace(recipe("fast90"), epochs=8, progressive_resize="16:0.25,24:0.375")
    assert [epoch_image_size(config, e, 43) for e in range(1, 9)] == [16, 16, 24, 24, 24, 32, 32, 32]
    # a time budget's plan (max_steps) moves the boundaries with the run's length
    planned = dataclasses.replace(config, max_steps=4 * 43)
    assert [epoch_image_size(planned, e, 43) for e in range(1, 5)] == [16, 24, 24, 32]
    assert [epoch_image_size(TrainConfig(), e, 10) for e in (1, 5)] == [32, 32]


def test_step_costs_count_a_small_step_by_its_pixels() -> None:
    config = dataclasses.replace(TrainConfig(), epochs=4, progressive_resize="16:0.25,24:0.25")
    assert mean_step_cost(config) == pytest.approx(0.25 * 0.25 + 0.25 * 0.5625 + 0.5)
    assert step_costs(config, 10, 0, 40) == pytest.approx(10 * (0.25 + 0.5625 + 1 + 1))
    assert step_costs(config, 10, 5, 15) == pytest.approx(5 * 0.25 + 5 * 0.5625)
    assert mean_step_cost(TrainConfig()) == 1 and step_costs(TrainConfig(epochs=2), 10, 0, 20) == 20


def test_the_loader_scales_its_batches_to_the_epochs_size() -> None:
    images = torch.full((20, 3, 32, 32), 200, dtype=torch.uint8)
    images[:, :, :, 16:] = 40  # left half bright, right half dark: antialiased, the halves keep their values
    loader = TensorLoader(ImageSet(images, torch.zeros(20, dtype=torch.long), ["a"]), 10, torch.device("cpu"),
                          ([0.0] * 3, [1.0] * 3), shuffle=True)
    loader.set_epoch(1, 16)
    small = next(iter(loader))[0]
    assert small.shape == (10, 3, 16, 16)
    assert small[..., :7].mul(255).allclose(torch.tensor(200.0), atol=0.5)
    assert small[..., 9:].mul(255).allclose(torch.tensor(40.0), atol=0.5)
    loader.set_epoch(2, 32)
    assert next(iter(loader))[0].shape == (10, 3, 32, 32)


def test_a_run_trains_each_epoch_at_its_size_and_evaluates_at_full_size(tmp_path: Path, image_folder_writer,
                                                                        monkeypatch) -> None:
    image_folder_writer(tmp_path / "images", {name: 20 for name in ("cat", "dog")})
    sizes, real_make = [], TensorLoader._make_batch

    def recording(self, index, shard):
        batch = real_make(self, index, shard)
        sizes.append((self.shuffle, batch[0].shape[-1]))
        return batch

    monkeypatch.setattr(TensorLoader, "_make_batch", recording)
    assert main(["train", "--data", str(tmp_path / "images"), *TINY, "--epochs", "4", "--progressive-resize",
                 "16:0.25,24:0.25", "--out", str(tmp_path / "run")]) == 0
    trained = [size for shuffled, size in sizes if shuffled]
    assert trained == [16] * 3 + [24] * 3 + [32] * 6  # 28 training images, batch 8: 3 steps an epoch
    assert {size for shuffled, size in sizes if not shuffled} == {32}


def test_a_model_sized_for_one_image_size_is_refused_before_training(tmp_path: Path, image_folder_writer,
                                                                      capsys) -> None:
    image_folder_writer(tmp_path / "images", {name: 10 for name in ("cat", "dog")})
    assert main(["train", "--data", str(tmp_path / "images"), *TINY, "--model", "cifar10_cnn",
                 "--progressive-resize", "16:0.5", "--out", str(tmp_path / "run")]) == 2
    assert "cifar10_cnn takes only 32-px images" in capsys.readouterr().err
