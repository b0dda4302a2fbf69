"""What the benchmarks write for other tools is in the layout those tools read."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_airbench_gets_our_split_in_its_own_layout(tmp_path: Path, image_folder_writer) -> None:
    """airbench's CifarLoader reads {'images': uint8 [N, 32, 32, 3], 'labels', 'classes'} (NHWC)."""
    image_folder_writer(tmp_path / "images", {name: 10 for name in ("cat", "dog")})
    _load("vs_airbench").write_airbench_data(str(tmp_path / "images"), 4, tmp_path / "cifar10")
    train = torch.load(tmp_path / "cifar10" / "train.pt", weights_only=True)
    test = torch.load(tmp_path / "cifar10" / "test.pt", weights_only=True)
    assert train["images"].shape == (16, 32, 32, 3) and train["images"].dtype == torch.uint8
    assert test["images"].shape == (4, 32, 32, 3) and test["labels"].tolist() == [0, 0, 1, 1]
    assert train["classes"] == ["cat", "dog"]


def test_the_half_factorial_sweep_is_balanced_and_keeps_pairs_apart() -> None:
    """sweep.py's half fraction of 5 options: 16 distinct configurations, each option on in half of them,
    and every pair of options in all four on/off combinations equally often (so a main effect is not
    mixed with another option's, nor with a pair's interaction)."""
    import itertools

    designs = _load("sweep").designs
    half = designs(5, half=True)
    assert len(half) == len(set(half)) == 16
    for k in range(5):
        assert sum(levels[k] for levels in half) == 8
    for a, b in itertools.combinations(range(5), 2):
        assert all(sum((lv[a], lv[b]) == pair for lv in half) == 4 for pair in itertools.product((0, 1), repeat=2))
    assert len(designs(3, half=False)) == 8


def test_the_learner_baseline_trains_the_notebook_way_until_it_reaches_the_target(tmp_path: Path,
                                                                                   image_folder_writer) -> None:
    """Two classes told apart by colour: the notebook's loop gets there, and stops at the first epoch that
    reaches the target; an unreachable target runs every epoch and reports none."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "colours"
    rng = np.random.default_rng(0)
    for name, rgb in (("blue", (40, 40, 200)), ("red", (200, 40, 40))):
        (root / name).mkdir(parents=True)
        for i in range(40):
            array = np.clip(np.array(rgb) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(array).save(root / name / f"{i:02d}.png")
    learner = _load("learner_baseline")
    reached = learner.time_to_75(root, max_epochs=6, n_val=20, target=0.9)
    assert reached["epoch_75"] == len(reached["curve"]) and reached["curve"][-1] >= 0.9
    assert all(acc < 0.9 for acc in reached["curve"][:-1]) and reached["to_75"] > 0
    never = learner.time_to_75(root, max_epochs=2, n_val=20, target=1.01)
    assert never["to_75"] is None and len(never["curve"]) == 2


def test_step_sizes_prints_one_row_per_recipe_and_caches_each_size(monkeypatch, capsys, cache_dir: Path) -> None:
    """The table benchmarks/step_sizes.py prints: a speed per size and the step ratios, largest size 1;
    the speeds land in the tuner's cache, one entry per size."""
    monkeypatch.setattr("sys.argv", ["step_sizes.py", "--recipes", "fast75", "--sizes", "16", "32"])
    _load("step_sizes").main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| fast75 |")]
    assert len(rows) == 1 and rows[0].rstrip(" |").endswith("/ 1.00")
    table = (cache_dir / "tuning.json").read_text()
    assert "16px" in table and "32px" in table
