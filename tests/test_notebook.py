"""The example notebook runs top to bottom in a headless kernel, on 2,000 shared images for one epoch
(and the depth experiment for 4 steps)."""
from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_notebook_executes(shared_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbclient  # dev dependencies: a missing one fails the test rather than skipping it
    import nbformat

    # the kernel inherits these (and the test's own CIFARLAB_CACHE): the notebook's parameter cell reads them
    monkeypatch.setenv("CIFARLAB_NB_DATA", str(shared_images))
    monkeypatch.setenv("CIFARLAB_NB_VAL_SPLIT", "400")
    monkeypatch.setenv("CIFARLAB_NB_EPOCHS", "1")
    monkeypatch.setenv("CIFARLAB_NB_DEPTH_STEPS", "4")  # the depth experiment's four nets, 4 steps each
    monkeypatch.setenv("CIFARLAB_NB_DEPTH_IMAGES", "800")
    notebook = nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "1600 training and 400 validation images" in text and "epoch 1/1" in text
    assert "The gap went from" in text and "precision" in text
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert "narrow" in text and "wide" in text  # the comparison table of the two channel widths
    assert "plain56: training error" in text and "resnet56: training error" in text  # the depth experiment ran
    # the curves (loss and accuracy), kernels, feature maps, Grad-CAM, confusion matrix, mistakes, reliability,
    # gap, the two runs compared, plain against residual nets
    assert len(pictures) == 10
    assert "Grad-CAM" in "".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
