"""The command line end to end: train -> run folder -> eval, and clean one-line errors for bad input."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifarlab.cli import main

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture
def image_root(tmp_path: Path, image_folder_writer) -> Path:
    """Three classes of 20 images each, class folders directly under the root (no test split)."""
    root = tmp_path / "images"
    image_folder_writer(root, {name: 20 for name in CLASSES})
    return root


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real command, as a user runs it (a fresh process: exit status, stdout, stderr)."""
    return subprocess.run([sys.executable, "-m", "cifarlab", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)


TINY = ["--model", "cifar10_cnn", "--epochs", "2", "--batch-size", "16", "--val-split", "12", "--seed", "3"]


def test_train_writes_a_complete_run_folder_and_eval_agrees(image_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(image_root), *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "evaluating on val: 12 images held out" in printed
    assert "epoch 1/2" in printed and "epoch 2/2" in printed  # one plain line per epoch when not a terminal

    assert sorted(p.name for p in out.iterdir()) == ["config.json", "eval", "metrics.csv", "model.pt", "summary.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 2 and config["batch_size"] == 16 and config["val_split"] == 12
    assert config["data"] == str(image_root.resolve()) and config["model"] == "cifar10_cnn"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "val" and summary["eval_images"] == 12 and summary["train_images"] == 48
    assert summary["images_per_second"] > 0 and summary["versions"]["torch"] == torch.__version__
    assert float(rows[-1]["val_acc"]) == pytest.approx(summary["accuracy"], abs=1e-6)

    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["n"] == 12
    assert result["accuracy"] == pytest.approx(summary["accuracy"], abs=1e-9)  # the same held-out images
    assert result["loss"] == pytest.approx(summary["loss"], rel=1e-4)
    assert list(result["per_class_accuracy"]) == CLASSES

    assert main(["eval", str(out / "model.pt"), "--split", "train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 48


def test_compile_trains_the_same_network_and_saves_plain_weights(image_root: Path, tmp_path: Path) -> None:
    """--compile trains through torch.compile; model.pt holds the plain module's weights (no `_orig_mod.`
    prefix), so `eval` loads it; the compiled run learns as the eager one does, to rounding."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    args = ["train", "--data", str(image_root), *TINY, "--precision", "fp32", "--no-channels-last"]
    assert run_cli(*args, "--out", str(eager)).returncode == 0
    result = run_cli(*args, "--out", str(compiled), "--compile")
    assert result.returncode == 0, result.stderr
    assert json.loads((compiled / "config.json").read_text())["compile"] is True
    weights = torch.load(compiled / "model.pt", weights_only=True)["state_dict"]
    assert not any(name.startswith("_orig_mod") for name in weights)
    losses = [[float(r["train_loss"]) for r in csv.DictReader((run / "metrics.csv").open())] for run in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert run_cli("eval", str(compiled), "--json").returncode == 0


def test_without_eval_each_epoch_only_the_last_epoch_is_evaluated(image_root: Path, tmp_path: Path) -> None:
    """--no-eval-each-epoch (fast75's and fast94's default): the held-out split is scored after the last epoch only,
    which still gives the run its accuracy; the other epochs' validation cells stay empty."""
    run = tmp_path / "run"
    assert main(["train", "--data", str(image_root), *TINY, "--epochs", "3", "--no-eval-each-epoch",
                 "--out", str(run)]) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [bool(r["val_acc"]) for r in rows] == [False, False, True]
    accuracy = json.loads((run / "summary.json").read_text())["accuracy"]
    assert accuracy == pytest.approx(float(rows[-1]["val_acc"]), abs=1e-6)


def test_official_format_evaluates_on_its_test_split(tmp_path: Path, cifar10_tar_gz, capsys) -> None:
    archive, data = cifar10_tar_gz
    out = tmp_path / "run"
    assert main(["train", "--data", str(archive), "--epochs", "1", "--batch-size", "8", "--out", str(out)]) == 0
    assert "evaluating on the source's test split (10 images)" in capsys.readouterr().out
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["n"] == len(data.test_labels)


def test_a_relative_data_path_is_recorded_absolute(image_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(image_root.parent)
    out = tmp_path / "run"
    assert main(["train", "--data", image_root.name, *TINY, "--epochs", "1", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["data"] == str(image_root)
    monkeypatch.chdir(tmp_path.parent)  # eval from elsewhere still finds the run's data
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 12
    assert main(["eval", str(out), "--data", str(image_root), "--json"]) == 0  # the same source, named again
    assert json.loads(capsys.readouterr().out)["n"] == 12


@pytest.mark.parametrize("spelling", ["dotdot", "symlink"])
def test_eval_knows_the_runs_own_source_however_it_is_spelled(spelling: str, image_root: Path, tmp_path: Path,
                                                              monkeypatch, capsys) -> None:
    """The run was trained from `other/../images` (config.json keeps that spelling) and is evaluated from
    the plain path, or through a link: the same file, so the same 12 held-out images, not all 60 (which
    it mostly trained on: a higher, meaningless accuracy)."""
    (tmp_path / "other").mkdir()
    trained_from = tmp_path / "other" / ".." / "images"
    named = image_root
    if spelling == "symlink":
        named = tmp_path / "link"
        named.symlink_to(image_root, target_is_directory=True)
    out = tmp_path / "run"
    assert main(["train", "--data", str(trained_from), *TINY, "--epochs", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(named), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["split"], result["n"]) == ("val", 12)
    assert result["accuracy"] == pytest.approx(summary["accuracy"], abs=1e-9)


def test_eval_text_output_lists_every_class(image_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    main(["train", "--data", str(image_root), *TINY, "--epochs", "1", "--out", str(out)])
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("val accuracy ") and all(name in text for name in CLASSES)


def test_eval_refuses_data_with_other_classes(image_root: Path, tmp_path: Path, image_folder_writer, capsys) -> None:
    out = tmp_path / "run"
    main(["train", "--data", str(image_root), *TINY, "--epochs", "1", "--out", str(out)])
    other = tmp_path / "other"
    image_folder_writer(other, {"apple": 3, "pear": 3, "plum": 3})
    assert main(["eval", str(out), "--data", str(other)]) == 2
    assert "do not match the model's" in capsys.readouterr().err


def test_out_folder_is_never_overwritten(image_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["train", "--data", str(image_root), *TINY, "--out", str(out)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_default_run_folders_are_new_each_time(image_root: Path, tmp_path: Path) -> None:
    # run from tmp_path so runs/ lands there, not in the repository
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert main(["train", "--data", str(image_root), *TINY, "--epochs", "1"]) == 0
        assert main(["train", "--data", str(image_root), *TINY, "--epochs", "1"]) == 0
    finally:
        os.chdir(cwd)
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all((r / "model.pt").exists() for r in runs)


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "no/such/place"], "no/such/place: no such file or folder"),
    (["train", "--data", "IMAGES", "--lr", "0"], "--lr 0: must be greater than 0"),
    (["train", "--data", "IMAGES", "--batch-size", "0"], "--batch-size 0: must be 1 or more"),
    (["train", "--data", "IMAGES", "--epochs", "0"], "--epochs 0: must be greater than 0"),
    (["train", "--data", "IMAGES", "--val-split", "100000"], "--val-split 100000: must be from 0 to"),
    (["train", "--data", "IMAGES", "--recipe", "sed"], "unknown recipe 'sed' (did you mean seed?)"),
    (["train", "--data", "IMAGES", "--model", "cifar_cnn"], "unknown model 'cifar_cnn' (did you mean cifar10_cnn?)"),
    (["eval", "no/such/run"], "no/such/run: no such run folder or checkpoint"),
    (["train", "--data", "IMAGES", "--cuda-graph", "--compile"],
     "--cuda-graph True: records one compiled or one-size model: with --compile or --progressive-resize add"),
    (["train", "--data", "IMAGES", "--progressive-resize", "24:0.5,16:0.2"],
     "--progressive-resize 24:0.5,16:0.2: SIZE:SHARE pairs with sizes rising"),
    (["train", "--data", "IMAGES", "--progressive-resize", "16:0.7,24:0.3"], "shares above 0 adding up to less than 1"),
    (["train", "--data", "IMAGES", "--tta-share", "0"], "--tta-share 0: must be in (0, 1]"),
])
def test_bad_input_is_one_line_and_status_2(args: list[str], message: str, image_root: Path, tmp_path: Path) -> None:
    args = [str(image_root) if a == "IMAGES" else a for a in args]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("cifarlab: error: ")
    assert message in result.stderr
    assert not (tmp_path / "runs").exists()  # a failed start leaves no run folder


def test_eval_of_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = run_cli("eval", str(tmp_path))
    assert result.returncode == 2 and "not a run folder" in result.stderr


def test_help_explains_the_commands() -> None:
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for flag in ("--data", "--dataset", "--recipe", "--model", "--epochs", "--batch-size", "--lr", "--val-split",
                 "--seed", "--device", "--out"):
        assert flag in result.stdout


def test_a_training_step_is_three_cifarlab_frames_below_the_command(image_root: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """From the `train` handler to optimizer.step(): run_training -> train_epochs -> train_step, no more."""
    import inspect

    import cifarlab
    from cifarlab.optim import Adam

    package = str(Path(cifarlab.__file__).parent)
    stacks = []
    real_step = Adam.step

    def spy(self, *args, **kwargs):
        stacks.append([f.function for f in inspect.stack() if f.filename.startswith(package)])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Adam, "step", spy)
    assert main(["train", "--data", str(image_root), *TINY, "--out", str(tmp_path / "run")]) == 0
    training = [stack for stack in stacks if "train_epochs" in stack]  # not the layout/precision timing steps
    assert training
    below_handler = training[0][:training[0].index("_train_command")]
    assert below_handler == ["train_step", "train_epochs", "run_training"]
