"""Evaluation views, TensorBoard events and report.html, down to a real headless Chromium rendering it."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.cli import main
from cifarlab.evaluation import run_images
from cifarlab.rundir import read_metrics
from conftest import missing, write_image_folders

CLASSES = ["cat", "dog", "frog"]
VIEWS = ["confusion_matrix.png", "eval.json", "reliability.png", "worst_mistakes.png"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny 2-epoch run (with --tensorboard) that the tests of this module look at."""
    root = tmp_path_factory.mktemp("report")
    write_image_folders(root / "images", {name: 20 for name in CLASSES})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFARLAB_CACHE", str(root / "cache"))
        assert main(["train", "--data", str(root / "images"), "--epochs", "2", "--batch-size", "16",
                     "--val-split", "12", "--seed", "1", "--tensorboard", "--out", str(root / "run")]) == 0
    return root / "run"


def test_train_ends_by_writing_numbers_and_no_pictures(run_dir: Path) -> None:
    """metrics.csv and eval.json: the pictures are drawn by `report` (below) or `eval --out`, not at every
    run's end."""
    assert not list(run_dir.rglob("*.png"))
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["eval.json"]
    views = json.loads((run_dir / "eval" / "eval.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert views["split"] == "val" and views["n"] == 12
    assert views["accuracy"] == pytest.approx(summary["accuracy"])  # the last epoch's own predictions
    assert list(views["per_class"]) == CLASSES and len(views["confusion_matrix"]) == 3
    assert 0 <= views["ece"] <= 1 and sum(views["calibration_bins"]["count"]) == 12


def test_eval_out_writes_the_same_views_and_reports_the_tta_gain(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "views"
    assert main(["eval", str(run_dir), "--tta", "2", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == VIEWS
    tta = result["tta"]
    assert tta["views"] == 6 and tta["gain"] == pytest.approx(tta["accuracy"] - result["accuracy"])
    assert set(result["per_class"]["cat"]) == {"precision", "recall"} and 0 <= result["ece"] <= 1
    written = json.loads((out / "eval.json").read_text())
    assert written["tta"] == tta and written["accuracy"] == pytest.approx(tta["accuracy"])  # views of the TTA output

    assert main(["eval", str(run_dir), "--tta", "1"]) == 0
    assert "with test-time augmentation (2 views)" in capsys.readouterr().out


def test_tensorboard_events_sit_beside_metrics_csv(run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(run_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("accuracy/val")] == [1, 2]
    assert {"loss/train", "loss/val", "accuracy/train", "lr"} <= set(accumulator.Tags()["scalars"])


def test_tensorboard_missing_is_one_line_and_leaves_no_run(tmp_path: Path, monkeypatch, capsys) -> None:
    write_image_folders(tmp_path / "images", {name: 4 for name in CLASSES})
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    assert main(["train", "--data", str(tmp_path / "images"), "--epochs", "1", "--val-split", "3", "--tensorboard",
                 "--out", str(tmp_path / "run")]) == 2
    assert "pip install" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_report_is_one_self_contained_file(run_dir: Path, capsys) -> None:
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text()
    assert "://" not in page  # no URL of any kind (':' is not a base64 character, so images cannot hide one)
    assert not re.search(r"""\b(src|href)\s*=\s*(?!["']?data:)""", page)  # every src is an embedded data: URI
    assert "url(" not in page and "@import" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    for text in ("Timing and throughput", "Full config", "Learning curves", "Generalisation gap", "Confusion matrix",
                 "Calibration", "Most confident mistakes", "throughput", "expected calibration error"):
        assert text in page
    # curves, gap, confusion matrix, reliability, worst mistakes; and 5 of "What the network sees" (test_report_explain)
    assert page.count("<img ") == 10


def test_report_draws_the_views_train_left_as_numbers(run_dir: Path, tmp_path: Path) -> None:
    """From eval.json, and the worst mistakes from the run's own images; without those, a note instead."""
    assert main(["report", str(run_dir), "--out", str(tmp_path / "drawn.html")]) == 0
    assert (tmp_path / "drawn.html").read_text().count("<img ") == 10
    copy = tmp_path / "moved"
    shutil.copytree(run_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["data"] = str(tmp_path / "gone")  # the images have moved away since
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["report", str(copy)]) == 0
    page = (copy / "report.html").read_text()
    assert page.count("<img ") == 5 and "not drawn: " in page and "gone" in page  # 4 + the first-layer filters


def drawn_report(run_dir: Path, monkeypatch) -> dict[str, object]:
    """The report's pictures, by their alt text, as the matplotlib figures they were drawn from; the page
    must embed exactly those figures' PNGs."""
    import cifarlab.report as report_module

    drawn = []
    real_png = report_module.figure_png
    monkeypatch.setattr(report_module, "figure_png", lambda figure: drawn.append((figure, real_png(figure)))
                        or drawn[-1][1])
    page = report_module.render_report(run_dir)
    embedded = {alt: base64.b64decode(data) for alt, data in
                re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">', page)}
    by_png = {png: figure for figure, png in drawn}
    assert len(embedded) == len(drawn) and set(embedded.values()) == set(by_png)  # distinct alt texts, too
    return {alt: by_png[png] for alt, png in embedded.items()}


def test_the_report_pictures_show_the_numbers_of_the_run(run_dir: Path, monkeypatch) -> None:
    """Each picture is read back from its figure: the numbers drawn are metrics.csv's and eval.json's."""
    figures = drawn_report(run_dir, monkeypatch)
    core = {"confusion matrix", "generalisation gap", "learning curves", "reliability", "worst mistakes"}
    seen = {"first-layer filters", "top patches", "feature maps, right", "feature maps, wrong", "Grad-CAM, right",
            "Grad-CAM, wrong", "mistakes"}  # "What the network sees" (tests/test_report_explain.py)
    assert core <= set(figures) and "first-layer filters" in figures and set(figures) <= core | seen
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    rows = read_metrics(run_dir / "metrics.csv")

    matrix = figures["confusion matrix"].axes[0]
    counts = np.array([int(t.get_text()) for t in matrix.texts]).reshape(3, 3)  # one number per cell, row by row
    assert counts.tolist() == ev["confusion_matrix"] and counts.sum() == ev["n"] and np.trace(counts) == ev["correct"]
    shares = np.asarray(matrix.get_images()[0].get_array())
    assert np.allclose(shares, counts / counts.sum(axis=1, keepdims=True))  # coloured by the true class's share
    assert [t.get_text() for t in matrix.get_xticklabels()] == CLASSES

    loss_ax, acc_ax = figures["learning curves"].axes[:2]
    (train_loss, val_loss), (train_acc, val_acc) = loss_ax.get_lines(), acc_ax.get_lines()
    assert list(train_loss.get_ydata()) == [r["train_loss"] for r in rows]
    assert list(val_acc.get_ydata()) == [r["val_acc"] for r in rows] and list(val_acc.get_xdata()) == [1, 2]

    gap = figures["generalisation gap"].axes[1]
    assert [bar.get_height() for bar in gap.patches] == pytest.approx(
        [100 * (r["train_acc"] - r["val_acc"]) for r in rows])

    top, bottom = figures["reliability"].axes[:2]
    bins = ev["calibration_bins"]
    assert [bar.get_height() for bar in bottom.patches] == bins["count"]
    assert [bar.get_height() for bar in top.patches[:len(bins["count"])]] == pytest.approx(
        [a or 0.0 for a in bins["accuracy"]])
    assert f"ECE {100 * ev['ece']:.2f}%" in top.get_title()

    mistakes = figures["worst mistakes"].axes[0]
    assert [t.get_text() for t in mistakes.texts] == [f"true: {m['true']}\npred: {m['predicted']} "
                                                      f"({m['probability']:.2f})" for m in ev["worst_mistakes"]]


COLOURS = {"blue": (40, 40, 200), "green": (40, 200, 40), "red": (200, 40, 40)}


def test_a_report_of_a_run_with_a_known_mistake_shows_that_image(tmp_path: Path, monkeypatch) -> None:
    """Classes told apart by colour, and one held-out green image painted red: the trained model calls
    it red, with confidence, and the report's worst mistakes show that very image, labelled so."""
    from cifarlab.data import load_data

    rng = np.random.default_rng(0)
    root = tmp_path / "colours"
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(24):
            noisy = np.clip(np.array(rgb) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / name / f"{i:02d}.png")
    # the held-out split follows the labels and the seed only, so it can be chosen before the paint
    val = load_data(str(root), val_split=9, seed=1).val
    green = next(image for image, label in zip(val.images, val.labels) if val.classes[label] == "green")
    victim = next(path for path in sorted((root / "green").iterdir())
                  if np.array_equal(np.asarray(Image.open(path)), green.permute(1, 2, 0).numpy()))
    painted = np.clip(np.array(COLOURS["red"]) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(painted).save(victim)
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--model", "cifar10_cnn", "--epochs", "4", "--batch-size", "16",
                 "--val-split", "9", "--seed", "1", "--lr", "0.003", "--device", "cpu", "--out", str(run)]) == 0

    ev = json.loads((run / "eval" / "eval.json").read_text())
    worst = ev["worst_mistakes"][0]
    assert (worst["true"], worst["predicted"]) == ("green", "red") and worst["probability"] > 0.5
    images = run_images(json.loads((run / "config.json").read_text()), "val")
    assert np.array_equal(images[worst["index"]].permute(1, 2, 0).numpy(), painted)
    mosaic = np.asarray(drawn_report(run, monkeypatch)["worst mistakes"].axes[0].get_images()[0].get_array())
    assert np.array_equal(mosaic[12:44, 4:36], painted)  # the first tile: 12 px for its labels, 4 px aside


def test_report_of_a_run_before_its_first_epoch_says_so(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "early"
    copy.mkdir()
    shutil.copy(run_dir / "config.json", copy)
    (copy / "metrics.csv").write_text((run_dir / "metrics.csv").read_text().splitlines()[0] + "\n1,0.5")  # half a row
    assert main(["report", str(copy)]) == 0
    page = (copy / "report.html").read_text()
    assert "the run has not finished" in page and "no epoch has finished yet" in page and "<img " not in page


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    missing("chromium is not installed (apt-get install chromium)")  # .ci/run installs it


def _headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    assert main(["report", str(run_dir)]) == 0
    url = (run_dir / "report.html").resolve().as_uri()

    # the page's script titles it loaded:N/M once loaded: N images decoded with a real size, of M
    dom = _headless(chromium, tmp_path / "profile-dom", "--dump-dom", url)
    title = re.search(r"<title>(.*?)</title>", dom.stdout)
    assert title and title.group(1) == "loaded:10/10", (title, dom.stderr[-2000:])
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]  # errors, CSP refusals, logs
    assert console == []

    shot = tmp_path / "report.png"
    result = _headless(chromium, tmp_path / "profile-shot", "--hide-scrollbars", "--window-size=1280,4200",
                       f"--screenshot={shot}", url)
    assert shot.exists() and shot.read_bytes()[:8] == PNG, result.stderr[-2000:]
    assert shot.stat().st_size > 50_000  # a rendered page of figures, not a blank one
    assert [line for line in result.stderr.splitlines() if ":CONSOLE" in line] == []


def test_compare_page_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    """`cifarlab compare --out` writes a page as self-contained as the report: checked the same way."""
    chromium = _chromium()
    out = tmp_path / "comparison"
    assert main(["compare", str(run_dir), str(run_dir), "--out", str(out)]) == 0
    page = out / "compare.html"
    assert "://" not in page.read_text()
    dom = _headless(chromium, tmp_path / "profile-compare", "--dump-dom", page.resolve().as_uri())
    title = re.search(r"<title>(.*?)</title>", dom.stdout)
    assert title and title.group(1) == "loaded:1/1", (title, dom.stderr[-2000:])
    assert [line for line in dom.stderr.splitlines() if ":CONSOLE" in line] == []
