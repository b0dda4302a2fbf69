"""The classroom workflow end to end on the command line: runs compared and listed, a run rerun from its
config, a GPU memory cap, eval agreeing with train's test-time augmentation, the report's order."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cifarlab.cli import main

TINY = ["--model", "cifar10_cnn", "--batch-size", "16", "--val-split", "12", "--seed", "3"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Two finished runs of different lengths (1 and 2 epochs) on the same small image folder."""
    from tests.conftest import write_image_folders

    root = tmp_path_factory.mktemp("classroom")
    write_image_folders(root / "images", {name: 20 for name in ("cat", "dog", "frog")})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFARLAB_CACHE", str(root / "cache"))
        for name, epochs in (("short", "1"), ("long", "2")):
            assert main(["train", "--data", str(root / "images"), *TINY, "--epochs", epochs, "--tta", "1",
                         "--out", str(root / "runs" / name)]) == 0
    return root / "runs" / "short", root / "runs" / "long", root / "images"


def test_compare_two_runs_and_a_missing_folder(two_runs, tmp_path: Path, capsys) -> None:
    short, long, _ = two_runs
    capsys.readouterr()
    out = tmp_path / "comparison"
    assert main(["compare", str(short), str(long), str(tmp_path / "nope"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.err.count("\n") == 1 and "nope" in printed.err and "Traceback" not in printed.err
    table = printed.out.splitlines()
    assert any(line.startswith("short") and "1/1" in line for line in table)
    assert any(line.startswith("long") and "2/2" in line for line in table)
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "compare.html").read_text()
    assert "short" in page and "long" in page and "http://" not in page and "https://" not in page


def test_compare_with_no_readable_run_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err == (f"cifarlab: error: no readable run folder among the 2 given ({tmp_path / 'a'}: no such "
                           f"folder | {tmp_path / 'b'}: no such folder); pass folders written by cifarlab train\n")


def test_runs_lists_newest_first(two_runs, capsys) -> None:
    short, long, _ = two_runs
    capsys.readouterr()
    assert main(["runs", str(short.parent)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["long", "short"]  # long was written last
    assert all("finished" in line for line in lines)


def test_train_config_reruns_a_run_with_overrides(two_runs, tmp_path: Path, capsys) -> None:
    short, _, _ = two_runs
    again = tmp_path / "again"
    assert main(["train", "--config", str(short), "--seed", "4", "--out", str(again)]) == 0
    before, after = (json.loads((run / "config.json").read_text()) for run in (short, again))
    assert after == {**before, "seed": 4}
    assert main(["train", "--config", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "--config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # one starting point: a recipe or a run's config
        main(["train", "--config", str(short), "--recipe", "seed"])
    assert exited.value.code == 2


def test_eval_uses_the_runs_own_test_time_augmentation(two_runs, capsys) -> None:
    short, _, _ = two_runs
    summary = json.loads((short / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(short), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tta_level"] == 1 and result["tta"]["views"] == 2
    assert result["tta"]["accuracy"] == pytest.approx(summary["tta"]["accuracy"])  # what train printed
    assert main(["eval", str(short), "--json", "--tta", "0"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["tta_level"] == 0 and "tta" not in plain


def test_gpu_memory_fraction_is_checked_and_noted_on_the_cpu(two_runs, tmp_path: Path, capsys,
                                                             monkeypatch) -> None:
    short, _, images = two_runs
    run = tmp_path / "capped"
    assert main(["train", "--data", str(images), *TINY, "--epochs", "1", "--device", "cpu",
                 "--gpu-memory-fraction", "0.22", "--out", str(run)]) == 0
    assert "--gpu-memory-fraction 0.22 has no effect on the CPU" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["gpu_memory_fraction"] == 0.22
    assert main(["train", "--data", str(images), "--gpu-memory-fraction", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert "--gpu-memory-fraction 1.5: must be in (0, 1]" in capsys.readouterr().err
    assert main(["eval", str(short), "--gpu-memory-fraction", "0.5"]) == 0
    assert "has no effect on the CPU" in capsys.readouterr().out
    monkeypatch.setenv("CIFARLAB_GPU_MEMORY_FRACTION", "lots")
    assert main(["eval", str(short)]) == 2
    assert "CIFARLAB_GPU_MEMORY_FRACTION=lots" in capsys.readouterr().err


def test_report_puts_the_headline_curves_and_confusion_matrix_first(two_runs, tmp_path: Path) -> None:
    _, long, _ = two_runs
    out = tmp_path / "report.html"
    assert main(["report", str(long), "--out", str(out)]) == 0
    page = out.read_text()
    order = [page.index(marker) for marker in ("class=headline", "Learning curves", "Confusion matrix",
                                               "Generalisation gap", "<details>")]
    assert order == sorted(order)
    assert "<summary>Full config" in page
