"""The real images in ../shared/data: read, split, trained on and evaluated through the command line.

These run in CI (they fail there, not skip, if the archive is missing).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cifarlab.cli import main
from cifarlab.data import load_data
from conftest import CIFAR10_CLASSES


def test_in_ci_missing_real_images_fail_and_elsewhere_skip(tmp_path: Path, monkeypatch) -> None:
    import conftest

    monkeypatch.setattr(conftest, "SHARED_ARCHIVE", tmp_path / "absent.tar.gz")
    for value, outcome in (("true", pytest.fail.Exception), ("1", pytest.fail.Exception),
                           ("false", pytest.skip.Exception), ("", pytest.skip.Exception)):
        monkeypatch.setenv("CI", value)
        with pytest.raises(outcome, match="the shared real images are missing"):
            conftest.require_shared_archive()


def test_shared_archive_reads_as_cifar10_with_a_stratified_val_split(shared_archive: Path, monkeypatch) -> None:
    data = load_data(str(shared_archive))
    assert data.classes == CIFAR10_CLASSES  # sorted folder names give CIFAR-10's label order
    assert len(data.train) == 45_000 and len(data.val) == 5_000 and data.test is None
    assert data.eval_split == "val"
    assert torch.bincount(data.val.labels).tolist() == [500] * 10
    assert data.train.images.shape[1:] == (3, 32, 32) and data.train.images.dtype == torch.uint8
    assert 100 < data.train.images.float().mean() < 150  # real photos, not noise or padding

    # the second load comes from the tensor cache, without reading the archive again
    def no_read(*args, **kwargs):
        raise AssertionError("the archive was read again")
    monkeypatch.setattr("cifarlab.data.cache.read_source", no_read)
    again = load_data(str(shared_archive))
    assert torch.equal(again.val.labels, data.val.labels)


def test_train_then_eval_on_the_real_images(shared_archive: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    # one epoch of the fast recipe: a short real run whose accuracy is far above chance (10%)
    assert main(["train", "--data", str(shared_archive), "--recipe", "fast75", "--epochs", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "evaluating on val: 5000 images held out" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "val" and summary["eval_images"] == 5000
    assert summary["accuracy"] > 0.45

    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["n"] == 5000
    assert result["accuracy"] == pytest.approx(summary["accuracy"], abs=1e-9)
