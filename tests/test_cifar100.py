"""CIFAR-100 end to end through the command line: fine labels, as many classes as the meta names,
from a local official-format folder (--data) and from a served archive (--dataset cifar100)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cifarlab.cli import main
from cifarlab.data import download
from cifarlab.data.download import md5_of
from test_download import _Server  # the 127.0.0.1 server the download tests use: never the internet

TINY = ["--model", "cifar10_cnn", "--epochs", "1", "--batch-size", "10", "--seed", "0", "--device", "cpu"]


def check_run(out: Path, classes: list[str], n_test: int, capsys) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "test" and summary["eval_images"] == n_test
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["per_class_accuracy"]) == classes  # the fine label names, in label order
    assert result["n"] == n_test and result["accuracy"] == pytest.approx(summary["accuracy"])


def test_cifar100_folder_trains_and_evaluates(tmp_path: Path, cifar100_writer, capsys) -> None:
    data = cifar100_writer(tmp_path / "cifar-100-python", train=40, test=15, num_classes=20)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "cifar-100-python"), *TINY, "--out", str(out)]) == 0
    assert "40 training images, 20 classes" in capsys.readouterr().out
    check_run(out, data.classes, 15, capsys)


def test_dataset_cifar100_downloads_and_trains(tmp_path: Path, cifar100_writer, archive_writer, monkeypatch,
                                               capsys) -> None:
    data = cifar100_writer(tmp_path / "src", train=30, test=12, num_classes=7)
    served = tmp_path / "served"
    served.mkdir()
    archive = archive_writer(tmp_path / "src", served / "cifar-100-python.tar.gz", "cifar-100-python/")
    server = _Server(served)
    try:
        monkeypatch.setenv("CIFARLAB_DATA_URL", server.url)
        monkeypatch.setitem(download.OFFICIAL_ARCHIVES, "cifar100", ("cifar-100-python.tar.gz", md5_of(archive)))
        out = tmp_path / "run"
        assert main(["train", "--dataset", "cifar100", *TINY, "--out", str(out)]) == 0
        assert server.requests == ["/cifar-100-python.tar.gz"]
        assert json.loads((out / "config.json").read_text())["dataset"] == "cifar100"
        check_run(out, data.classes, 12, capsys)
    finally:
        server.close()
