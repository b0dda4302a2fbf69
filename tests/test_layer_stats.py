"""--layer-stats: the recorded numbers are the ones autograd and the optimizer produced, layers.csv
survives a resume exactly, and nothing is left installed when training ends."""
from __future__ import annotations

import csv
import dataclasses
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.cli import main
from cifarlab.config import RECIPES, TrainConfig
from cifarlab.engine import Step, train_step
from cifarlab.errors import INTERRUPTED_STATUS, CifarlabError
from cifarlab.layer_stats import HIST_BINS, HIST_LIMIT, hist_edges, open_layer_stats, read_layer_stats
from cifarlab.trainer import run_training


class Tiny(nn.Module):
    """Linear -> functional ReLU -> Linear: the ReLU is F.relu, not a module, as in the ResNets."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def test_recorded_statistics_are_what_autograd_and_the_step_computed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tiny()
    lr = 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)  # no momentum: the update is -lr * gradient
    batches = [(torch.randn(16, 4) * 3, torch.randint(0, 3, (16,))) for _ in range(2)]
    step = Step(model, optimizer, torch.device("cpu"))
    with open_layer_stats(tmp_path, model, optimizer, every=2):
        train_step(step, batches[0])
        before = Tiny()  # the weights step 2 (the recorded one) starts from
        before.load_state_dict(model.state_dict())
        train_step(step, batches[1])
    rows = read_layer_stats(tmp_path / "layers.csv")
    assert [(r["step"], r["depth"], r["layer"], r["kind"]) for r in rows] == [(2, 1, "fc1", "linear"),
                                                                            (2, 2, "fc2", "linear")]
    # by hand: the forward pass, the loss's gradients from autograd, SGD's update
    x, y = batches[1]
    hidden = x @ before.fc1.weight.T + before.fc1.bias
    logits = F.relu(hidden) @ before.fc2.weight.T + before.fc2.bias
    grads = torch.autograd.grad(F.cross_entropy(logits, y), [before.fc1.weight, before.fc2.weight])
    for row, out, grad, weight, dead in ((rows[0], hidden, grads[0], before.fc1.weight, (hidden <= 0).double().mean()),
                                         (rows[1], logits, grads[1], before.fc2.weight, None)):
        out = out.detach().double()
        assert row["grad_norm"] == pytest.approx(grad.norm().item(), rel=1e-6)
        assert row["weight_norm"] == pytest.approx(weight.norm().item(), rel=1e-6)
        assert row["update_ratio"] == pytest.approx(lr * grad.norm().item() / weight.norm().item(), rel=1e-5)
        assert row["act_mean"] == pytest.approx(out.mean().item(), rel=1e-6)
        assert row["act_std"] == pytest.approx(math.sqrt(((out - out.mean()) ** 2).mean().item()), rel=1e-6)
        assert row["dead"] == (None if dead is None else pytest.approx(dead.item()))
        expected, _ = np.histogram(np.clip(np.arcsinh(out.numpy()), -HIST_LIMIT, HIST_LIMIT), HIST_BINS,
                                   (-HIST_LIMIT, HIST_LIMIT))
        assert row["hist"] == expected.tolist() and sum(row["hist"]) == out.numel()
    assert rows[0]["dead"] > 0  # the check above compared something
    assert hist_edges()[0] == pytest.approx(-math.sinh(HIST_LIMIT)) and len(hist_edges()) == HIST_BINS + 1
    # the hooks are gone: the model and the optimizer are as they were built
    assert not model._forward_hooks and not model._forward_pre_hooks and not model.fc1._forward_hooks
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_an_evaluation_forward_is_not_a_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = Step(model, optimizer, torch.device("cpu"))
    batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with open_layer_stats(tmp_path, model, optimizer, every=2):
        for _ in range(3):
            train_step(step, batch)
            with torch.no_grad():
                model.eval()(batch[0])
            model.train()
    assert sorted({r["step"] for r in read_layer_stats(tmp_path / "layers.csv")}) == [2]


def layer_lines(run: Path) -> list[str]:
    return (run / "layers.csv").read_text().splitlines()


def test_resume_drops_the_rows_after_the_checkpoint_and_writes_them_again(tmp_path: Path, image_folder_writer,
                                                                         monkeypatch, capsys) -> None:
    """Rows a killed run wrote after its last checkpoint (and half a line) are replaced by the same rows."""
    import cifarlab.cli as cli_module

    root = tmp_path / "images"
    image_folder_writer(root, {name: 20 for name in ("cat", "dog", "frog")})  # 48 train: 6 steps of 8
    config = dataclasses.replace(TrainConfig(), data=str(root), epochs=2, batch_size=8, val_split=12, seed=3,
                                 model_args={"channels": [8, 8, 16, 16], "hidden": 32}, layer_stats=2)
    run_training(config, str(tmp_path / "full"))
    full = layer_lines(tmp_path / "full")
    assert len(full) == 1 + 6 * 6  # the header, then steps 2, 4, ..., 12 times 6 layers
    assert [line.split(",")[0] for line in full[1::6]] == ["2", "4", "6", "8", "10", "12"]

    real, calls = F.cross_entropy, []

    def interrupting(*args, **kwargs):  # Ctrl-C during step 3: the checkpoint is after step 3
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", interrupting)
    monkeypatch.setattr(cli_module, "recipe", lambda name: config)
    out = tmp_path / "stopped"
    assert main(["train", "--out", str(out)]) == INTERRUPTED_STATUS
    assert layer_lines(out) == full[:7]  # step 2's rows
    with (out / "layers.csv").open("a") as file:  # what a kill after the checkpoint would have left
        file.write(full[7] + "\n" + full[8][:20])
    monkeypatch.setattr(F, "cross_entropy", real)
    assert main(["train", "--resume", str(out)]) == 0
    assert layer_lines(out) == full
    capsys.readouterr()


def test_off_writes_nothing_and_installs_nothing(tmp_path: Path, image_folder_writer, monkeypatch) -> None:
    import cifarlab.layer_stats as layer_stats_module

    root = tmp_path / "images"
    image_folder_writer(root, {name: 10 for name in ("cat", "dog")})
    monkeypatch.setattr(layer_stats_module.LayerStats, "__init__", lambda *a, **k: pytest.fail("installed"))
    config = dataclasses.replace(TrainConfig(), data=str(root), epochs=1, batch_size=8, val_split=4,
                                 model_args={"channels": [4, 4, 8, 8], "hidden": 8})
    assert config.layer_stats == 0
    run = run_training(config, str(tmp_path / "run"))
    assert not (run / "layers.csv").exists()


def test_recipes_and_the_option_check() -> None:
    assert RECIPES["seed"].layer_stats > 0
    assert all(c.layer_stats == 0 for name, c in RECIPES.items() if name.startswith("fast"))
    with pytest.raises(CifarlabError, match="--layer-stats -1"):
        TrainConfig(layer_stats=-1).validate()


def test_layers_csv_columns(tmp_path: Path) -> None:
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with open_layer_stats(tmp_path, model, optimizer, every=1):
        train_step(Step(model, optimizer, torch.device("cpu")), (torch.randn(4, 4), torch.randint(0, 3, (4,))))
    header = next(csv.reader((tmp_path / "layers.csv").open()))
    assert header[:10] == ["step", "depth", "layer", "kind", "grad_norm", "weight_norm", "update_ratio",
                           "act_mean", "act_std", "dead"]
    assert header[10:] == [f"h{i}" for i in range(HIST_BINS)]


# --- the pictures: report and compare --------------------------------------------------------------

@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_image_folders

    root = tmp_path_factory.mktemp("layers")
    write_image_folders(root / "images", {name: 20 for name in ("cat", "dog", "frog")})
    config = dataclasses.replace(TrainConfig(), data=str(root / "images"), epochs=1, batch_size=8, val_split=12,
                                 model="resnet20", model_args={"widths": [4, 4, 8]}, layer_stats=2)
    return run_training(config, str(root / "run"))


def test_the_depth_picture_draws_the_recorded_gradient_norms(recorded_run: Path) -> None:
    from cifarlab.layer_plots import draw_layer_stats

    rows = read_layer_stats(recorded_run / "layers.csv")
    assert sorted({r["step"] for r in rows}) == [2, 4, 6] and {r["depth"] for r in rows} == set(range(1, 21))
    grad_ax, _, dead_ax = draw_layer_stats(rows).axes[:3]
    first = [r["grad_norm"] for r in rows if r["step"] == 2]
    assert [line.get_label() for line in grad_ax.lines] == ["step 2", "step 4", "step 6"]
    assert list(grad_ax.lines[0].get_ydata()) == first and grad_ax.get_yscale() == "log"
    assert list(dead_ax.lines[0].get_xdata()) == list(range(1, 20))  # the classifier has no ReLU after it


def test_report_and_compare_show_the_layer_pictures(recorded_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["report", str(recorded_run)]) == 0
    page = (recorded_run / "report.html").read_text()
    assert "<h2>Layers by depth</h2>" in page and "<h2>Layer outputs over training" in page
    assert main(["compare", str(recorded_run), str(recorded_run), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "compare_depth.png").read_bytes()[:4] == b"\x89PNG"
    assert "<h2>Gradient by depth</h2>" in (tmp_path / "cmp" / "compare.html").read_text()
    capsys.readouterr()


def test_a_corrupt_layers_csv_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "layers.csv").write_text("step,depth\n2,x\n")
    with pytest.raises(CifarlabError, match=r"layers.csv: corrupt CSV \(line 2"):
        read_layer_stats(tmp_path / "layers.csv")


def test_compiled_steps_are_not_recorded_and_the_run_says_so(capsys) -> None:
    """Hooks do not fire inside a compiled graph: the recorder is left out, in one printed line."""
    import contextlib
    from types import SimpleNamespace

    from cifarlab.distributed import DistInfo
    from cifarlab.trainer import _layer_recorder

    session = SimpleNamespace(config=TrainConfig(layer_stats=5, compile=True), run=None,
                              runtime=SimpleNamespace(device=torch.device("cpu"), dist=DistInfo()))
    assert isinstance(_layer_recorder(session, 0), contextlib.nullcontext)
    assert "--layer-stats: not recorded with --compile" in capsys.readouterr().out
