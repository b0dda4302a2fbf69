"""Comparing run folders (compare.py) on small fake run folders written here: no training needed."""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch
from PIL import Image
from torch import nn

from cifarlab.compare import comparison_rows, format_comparison, format_runs, list_runs, load_runs, write_comparison
from cifarlab.errors import CifarlabError
from cifarlab.plots import draw_comparison

HEADER = "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n"


def metrics_lines(accuracies: list[float], seconds: float = 10.0) -> str:
    """One complete metrics.csv row per epoch, validation accuracy as given, train a bit above it."""
    return "".join(f"{e},{2.0 - acc:.4f},{min(acc + 0.05, 1):.4f},{2.1 - acc:.4f},{acc},0.1,{seconds}\n"
                   for e, acc in enumerate(accuracies, start=1))


def make_run(folder: Path, accuracies: list[float], planned: int, summary: dict | None = None,
             tail: str = "", model: str = "resnet20") -> Path:
    """A run folder as `cifarlab train` leaves it: config.json, metrics.csv (+ `tail`), summary.json if given."""
    folder.mkdir(parents=True)
    config = {"recipe": "baseline", "model": model, "model_args": {}, "epochs": planned, "batch_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    # csv.DictWriter's own line ends, as the run's writer leaves them
    (folder / "metrics.csv").write_bytes((HEADER + metrics_lines(accuracies) + tail).replace("\n", "\r\n").encode())
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps({"recipe": "baseline", "model": model, **summary}))
    return folder


@contextlib.contextmanager
def held_lock(run_dir: Path) -> Iterator[None]:
    """What a training process holds: RUN_DIR/.lock with its pid, under an exclusive flock. Taken
    here directly, as the run folder's writer takes it, then released and removed as the writer does."""
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        (run_dir / ".lock").unlink(missing_ok=True)
        os.close(fd)


def finished(accuracies: list[float], **extra) -> dict:
    return {"accuracy": accuracies[-1], "loss": 1.0, "epochs": len(accuracies), "wall_seconds": 123.5,
            "images_per_second": 2500.0, "device": "cpu (x86_64, 2 threads)", "precision": "torch.float32", **extra}


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    short = make_run(tmp_path / "short", [0.3, 0.5, 0.45], 3, finished([0.3, 0.5, 0.45], parameters=1234))
    long = make_run(tmp_path / "long", [0.2, 0.4, 0.6, 0.7, 0.72], 5, finished([0.2, 0.4, 0.6, 0.7, 0.72]),
                    model="cnn")
    return [short, long]


def test_two_finished_runs_of_different_lengths(two_runs: list[Path], tmp_path: Path) -> None:
    runs, problems = load_runs(two_runs)
    assert problems == [] and [r.name for r in runs] == ["short", "long"]
    assert [r.status for r in runs] == ["finished", "finished"]
    short, long = comparison_rows(runs)
    assert short["best_val_acc"] == pytest.approx(0.5) and short["final_val_acc"] == pytest.approx(0.45)
    assert (short["epochs_done"], short["epochs_planned"], short["parameters"]) == (3, 3, 1234)
    assert long["best_val_acc"] == long["final_val_acc"] == pytest.approx(0.72)
    assert (long["epochs_done"], long["epochs_planned"], long["model"]) == (5, 5, "cnn")
    assert long["parameters"] is None  # no "parameters" in its summary and no model.pt
    assert short["seconds"] == 123.5 and short["images_per_second"] == 2500.0 and short["status"] == "finished"

    table = format_comparison([short, long]).splitlines()
    assert len(table) == 3 and table[0].startswith("run ")
    assert table[1].startswith("short ") and "50.00%" in table[1] and "1,234" in table[1] and "3/3" in table[1]
    assert table[2].startswith("long ") and "72.00%" in table[2]
    assert table[1].index("3/3") == table[2].index("5/5")  # the columns line up

    out = tmp_path / "cmp"
    paths = write_comparison(runs, out)
    assert sorted(p.name for p in out.iterdir()) == ["compare.html", "compare.png"]  # no temporary file left
    with Image.open(io.BytesIO(paths["png"].read_bytes())) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 600
    page = paths["html"].read_text()
    assert "short" in page and "long" in page and "data:image/png;base64," in page
    assert "http:" not in page and "https:" not in page and "Content-Security-Policy" in page
    assert "loaded:" in page  # the load script the browser test of report.html also relies on


def test_the_picture_has_one_colour_per_run(two_runs: list[Path]) -> None:
    runs, _ = load_runs(two_runs)
    loss_ax, acc_ax = draw_comparison([(run.name, run.metrics) for run in runs]).axes
    for ax in (loss_ax, acc_ax):
        lines = ax.get_lines()
        assert [line.get_linestyle() for line in lines] == ["--", "-", "--", "-"]  # train dashed, validation solid
        assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color() == lines[3].get_color()
        assert list(lines[1].get_xdata()) == [1, 2, 3] and list(lines[3].get_xdata()) == [1, 2, 3, 4, 5]
    assert [t.get_text() for t in acc_ax.get_legend().get_texts()] == ["short", "long"]


def test_a_run_still_training(tmp_path: Path) -> None:
    """A half-written last line is not a row yet; the lock its process holds says it is training."""
    run_dir = make_run(tmp_path / "live", [0.3, 0.4], 10, tail="3,1.2,0.5")
    (run_dir / "checkpoint.pt").write_bytes(b"")
    with held_lock(run_dir):
        (run,), problems = load_runs([run_dir])
        assert problems == [] and run.status == "training" and run.summary is None
    assert [row["epoch"] for row in run.metrics] == [1, 2]
    row = comparison_rows([run])[0]
    assert (row["epochs_done"], row["epochs_planned"]) == (2, 10)
    assert row["seconds"] == pytest.approx(20.0)  # summed from metrics.csv, no summary yet
    assert row["final_val_acc"] == pytest.approx(0.4) and row["images_per_second"] is None
    (stopped,), _ = load_runs([run_dir])  # the lock released: the process is gone
    assert stopped.status == "stopped"
    # kill -9 leaves .lock behind, its pid possibly reused by now (here: a live one); no flock, so stopped
    (run_dir / ".lock").write_text(f"{os.getpid()}\n")
    (stale,), _ = load_runs([run_dir])
    assert stale.status == "stopped"


def test_empty_validation_columns_and_a_fresh_run(tmp_path: Path) -> None:
    no_val = make_run(tmp_path / "noval", [], 4, tail="1,2.0,0.3,,,0.1,5.0\n")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.json").write_text(json.dumps({"recipe": "seed", "model": "cnn", "epochs": 2}))
    runs, problems = load_runs([no_val, fresh])
    assert problems == []
    assert runs[0].metrics == [{"epoch": 1, "train_loss": 2.0, "train_acc": 0.3, "val_loss": None, "val_acc": None,
                                "lr": 0.1, "seconds": 5.0}]
    rows = comparison_rows(runs)
    assert rows[0]["best_val_acc"] is None and rows[1]["epochs_done"] == 0 and rows[1]["seconds"] == 0
    table = [line.split() for line in format_comparison(rows).splitlines()]
    assert table[1:] == [["noval", "baseline", "resnet20", "-", "-", "-", "1/4", "5.0", "-", "-", "stopped"],
                         ["fresh", "seed", "cnn", "-", "-", "-", "0/2", "0.0", "-", "-", "stopped"]]
    assert len(draw_comparison([(run.name, run.metrics) for run in runs]).axes) == 2  # nothing to draw for the fresh run, and no error


def test_bad_folders_are_one_line_each_and_the_rest_compares(two_runs: list[Path], tmp_path: Path) -> None:
    corrupt = make_run(tmp_path / "corrupt", [0.1], 2)
    (corrupt / "config.json").write_text('{"recipe": "baseline", ')
    bad_csv = make_run(tmp_path / "badcsv", [0.1], 2, tail="2,oops,0.1,0.1,0.1,0.1,1\n")
    not_run = tmp_path / "notes"
    not_run.mkdir()
    missing = tmp_path / "missing"
    runs, problems = load_runs([two_runs[0], missing, corrupt, not_run, bad_csv, two_runs[1]])
    assert [r.name for r in runs] == ["short", "long"]
    assert len(problems) == 4 and all("\n" not in p and p.endswith("skipped") for p in problems)
    assert problems[0].startswith(str(missing)) and "no such folder" in problems[0]
    assert "config.json" in problems[1] and "corrupt JSON" in problems[1]
    assert problems[2].startswith(str(not_run)) and "not a run folder" in problems[2]
    assert "metrics.csv" in problems[3] and "line 3" in problems[3] and "oops" in problems[3]
    assert len(comparison_rows(runs)) == 2


def test_all_folders_bad_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("[1, 2")
    with pytest.raises(CifarlabError, match="no readable run folder") as info:
        load_runs([tmp_path / "missing", tmp_path / "corrupt"])
    assert "missing" in str(info.value) and "corrupt" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CifarlabError, match="no run folders given"):
        load_runs([])


def test_folders_of_the_same_name_are_told_apart(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a" / "run", [0.1], 1)
    b = make_run(tmp_path / "b" / "run", [0.2], 1)
    runs, _ = load_runs([a, b])
    assert [r.name for r in runs] == [str(a), str(b)]


def test_list_runs_newest_first(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_run(root / "old", [0.3, 0.4], 2, finished([0.3, 0.4]))
    make_run(root / "new", [0.5], 4, tail="2,1.0")
    make_run(root / "middle", [0.6], 1, finished([0.6], accuracy=0.61))
    (root / "scratch").mkdir()  # not a run folder: not listed
    (root / "notes.txt").write_text("x")
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text("{")
    for age, name in enumerate(["new", "middle", "old", "broken"]):
        os.utime(root / name, (1_700_000_000 - 1000 * age,) * 2)
    rows = list_runs(root)
    assert [r["name"] for r in rows] == ["new", "middle", "old", "broken"]
    assert [r["status"] for r in rows] == ["stopped", "finished", "finished", "unreadable"]
    assert rows[1]["accuracy"] == pytest.approx(0.61)  # the summary's figure for a finished run
    assert (rows[0]["epochs_done"], rows[0]["epochs_planned"], rows[0]["accuracy"]) == (1, 4, 0.5)
    lines = format_runs(rows, root).splitlines()
    assert len(lines) == 4 and lines[0].startswith("new ") and "1/4 epochs" in lines[0] and "61.00%" in lines[1]
    assert "corrupt JSON" in lines[3]


def test_list_runs_without_runs(tmp_path: Path) -> None:
    assert list_runs(tmp_path / "missing") == []
    (tmp_path / "empty").mkdir()
    assert list_runs(tmp_path / "empty") == []
    message = format_runs([], tmp_path / "empty")
    assert "no runs under" in message and "cifarlab train" in message and "\n" not in message


def test_parameters_counted_from_model_pt(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    run_dir = make_run(tmp_path / "run", [0.5], 1, finished([0.5]))
    torch.save({"format": "cifarlab.model/1", "state_dict": model.state_dict()}, run_dir / "model.pt")
    other = make_run(tmp_path / "other", [0.5], 1, finished([0.5], parameters=99))
    torch.save({"state_dict": model.state_dict()}, other / "model.pt")  # the summary's figure wins
    damaged = make_run(tmp_path / "damaged", [0.5], 1, finished([0.5]))
    (damaged / "model.pt").write_bytes(b"not a torch file")
    runs, _ = load_runs([run_dir, other, damaged])
    rows = comparison_rows(runs)
    expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert [row["parameters"] for row in rows] == [expected, 99, None]
    assert len(model.state_dict()) > len(list(model.parameters()))  # the BatchNorm buffers were there to skip
