"""The report's section "What the network sees": its pictures, its note without captum, and the page
rendering in headless Chromium with every image decoded."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cifarlab.cli import main
from cifarlab.report_explain import most_confused
from conftest import write_image_folders
from test_report import _chromium, _headless

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report-explain")
    write_image_folders(root / "images", {name: 20 for name in CLASSES})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CIFARLAB_CACHE", str(root / "cache"))
        assert main(["train", "--data", str(root / "images"), "--epochs", "1", "--batch-size", "16",
                     "--val-split", "15", "--seed", "1", "--out", str(root / "run")]) == 0
    return root / "run"


def _section(page: str) -> str:
    return page[page.index("<h2>What the network sees</h2>"):page.index("<h2>Run</h2>")]


def test_most_confused_pair_is_the_largest_off_diagonal_count() -> None:
    assert most_confused([[5, 1, 0], [0, 4, 3], [2, 0, 9]]) == (1, 2)
    assert most_confused(np.eye(3, dtype=int).tolist()) in {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)}


def test_section_shows_kernels_patches_feature_maps_and_mistakes(run_dir: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    out = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    page = out.read_text()
    section = _section(page)
    for text in ("First-layer filters", "What deeper channels respond to", "the most frequent confusion",
                 "Grad-CAM on the most confident mistakes"):
        assert text in section
    pictures = section.count("<img ")
    assert 5 <= pictures <= 7  # kernels, patches, 1-2 images x (maps, Grad-CAM), mistakes
    assert "://" not in page
    dom = _headless(chromium, tmp_path / "profile", "--dump-dom", out.resolve().as_uri())
    title = re.search(r"<title>(.*?)</title>", dom.stdout)
    total = page.count("<img ")
    assert title and title.group(1) == f"loaded:{total}/{total}", (title, dom.stderr[-2000:])
    assert [line for line in dom.stderr.splitlines() if ":CONSOLE" in line] == []


def test_without_captum_the_section_says_so_and_keeps_the_rest(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    assert main(["report", str(run_dir), "--out", str(tmp_path / "report.html")]) == 0
    section = _section((tmp_path / "report.html").read_text())
    assert 'Grad-CAM maps not drawn: they need the captum package (pip install "cifarlab[explain]")' in section
    assert "First-layer filters" in section and "Grad-CAM on the most confident mistakes" not in section
    assert 3 <= section.count("<img ") <= 4  # kernels, patches, the feature maps of 1-2 images
