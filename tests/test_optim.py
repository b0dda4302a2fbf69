"""Muon: its orthogonalisation, its SGD half against torch's SGD, and a network it trains; torch's
optimizers without their compile wrapper; the schedules."""
import copy

import pytest
import torch

from cifarlab.engine import Step, train_step
from cifarlab.models import create_model
from cifarlab.optim import Muon, build_optimizer, build_scheduler, newton_schulz, param_groups


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_pushes_every_singular_value_towards_one(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    for shape in [(16, 72), (72, 16)]:  # wide and tall filter banks
        matrix = torch.randn(*shape, generator=generator)
        singular = torch.linalg.svdvals(newton_schulz(matrix, dtype=dtype))
        assert newton_schulz(matrix, dtype=dtype).shape == shape
        assert singular.min() > 0.5 and singular.max() < 1.3
        scaled = matrix * torch.logspace(-1, 1, shape[1])  # badly scaled columns
        before, after = torch.linalg.svdvals(scaled), torch.linalg.svdvals(newton_schulz(scaled, dtype=dtype))
        assert after.max() / after.min() < (before.max() / before.min()) / 3


def test_muon_orthogonalises_in_bf16_only_where_the_run_computes_in_bf16() -> None:
    """bf16 matmuls are emulated on CPUs without native kernels (20x slower there for these matrices)."""
    groups = lambda: param_groups(torch.nn.Conv2d(3, 4, 3), 0.1, 0.0, filter_lr=0.1)  # noqa: E731
    assert build_optimizer("muon", groups(), 0.85, torch.bfloat16).dtype == torch.bfloat16
    assert build_optimizer("muon", groups(), 0.85, None).dtype == torch.float32
    assert build_optimizer("muon", groups(), 0.85, torch.float16).dtype == torch.float32


def test_the_groups_that_are_not_filters_step_exactly_as_torch_sgd() -> None:
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    theirs.load_state_dict(ours.state_dict())
    groups = lambda model: param_groups(model, 0.1, 1e-2, bias_lr_scale=4.0, filter_lr=0.5)  # noqa: E731
    muon, sgd = Muon(groups(ours), 0.85), torch.optim.SGD(groups(theirs), momentum=0.85, nesterov=True)
    for step in range(3):
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(step))
        for model, optimizer in ((ours, muon), (theirs, sgd)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_muon_trains_the_fast_net_and_keeps_its_filters_at_a_fixed_norm() -> None:
    torch.manual_seed(0)
    model = create_model("fast_net", widths=[8, 16, 16], num_classes=2)
    images = torch.randn(64, 3, 32, 32)
    labels = (images.mean(dim=(1, 2, 3)) > 0).long()  # a rule a net can learn
    model.init_from_data(images)
    groups = param_groups(model, 0.05, 5e-4, bias_lr_scale=16, filter_lr=0.1)
    assert [len(g["params"]) for g in groups][-1] == 6 and groups[-1]["orthogonal"]  # 3 blocks x 2 convs
    step = Step(model, Muon(groups, 0.85), torch.device("cpu"))
    first = [train_step(step, (images, labels))[0].item()]
    losses = first + [train_step(step, (images, labels))[0].item() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    for p in groups[-1]["params"]:
        assert abs(p.norm().item() - len(p) ** 0.5) < 0.2 * len(p) ** 0.5


def _rates(schedule: str, total: int, warmup: int) -> list[float]:
    """The lr of every step of a schedule whose peak is 1."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = build_scheduler(optimizer, schedule, total, warmup)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_onecycle_warms_up_from_zero_to_the_peak_then_falls_linearly_to_zero() -> None:
    rates = _rates("onecycle", 100, 20)
    assert rates[0] == pytest.approx(1 / 20) and rates[19] == pytest.approx(1.0)
    assert rates[60] == pytest.approx(0.5) and rates[-1] == pytest.approx(1 / 80)


def test_triangle_is_airbench94s_from_a_fifth_of_the_peak_down_to_seven_hundredths() -> None:
    rates = _rates("triangle", 101, 20)
    assert rates[0] == pytest.approx(0.2 + 0.8 / 20) and rates[19] == pytest.approx(1.0)
    assert rates[100] == pytest.approx(1 - 0.93 * 80 / 81)
    assert min(rates) > 0.07 - 1e-9  # never below airbench's floor


def test_bias_decay_shrinks_biases_per_step_as_much_as_weights() -> None:
    """airbench's parametrisation: with a 64x lr, the biases' decay rate is divided by 64, so one step
    of SGD with zero gradients shrinks a bias and a weight by the same factor."""
    model = torch.nn.Linear(4, 3)
    for bias_decay, bias_shrink in ((False, 1.0), (True, 1 - 0.1 * 0.01)):
        with torch.no_grad():
            model.weight.fill_(1.0)
            model.bias.fill_(1.0)
        optimizer = torch.optim.SGD(param_groups(model, 0.1, 0.01, bias_lr_scale=64, bias_decay=bias_decay), lr=0.1)
        model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
        optimizer.step()
        assert model.weight[0, 0].item() == pytest.approx(1 - 0.1 * 0.01)
        assert model.bias[0].item() == pytest.approx(bias_shrink)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_torchs_optimizers_step_exactly_as_torch_does_without_importing_dynamo(name: str) -> None:
    """cifarlab's SGD/Adam/AdamW are torch's without the torch.compile wrapper around `step`: the same
    parameters after a few steps, bit for bit."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    theirs = copy.deepcopy(ours)
    reference = {"sgd": lambda groups: torch.optim.SGD(groups, momentum=0.85, nesterov=True),
                 "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    pairs = [(ours, build_optimizer(name, param_groups(ours, 0.1, 5e-4, 64), 0.85)),
             (theirs, reference(param_groups(theirs, 0.1, 5e-4, 64)))]
    for _ in range(3):
        x = torch.randn(16, 4)
        for model, optimizer in pairs:
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert isinstance(pairs[0][1], type(pairs[1][1]))


@pytest.mark.parametrize("recipe", ["fast75", "fast94", "seed"])  # Muon, SGD, Adam
def test_a_run_imports_neither_torch_dynamo_nor_matplotlib(recipe: str, tmp_path) -> None:
    """Importing torch._dynamo costs about 1 s of a 20 s fast75 run (5 s of a fast94 command on a fresh
    GPU machine): building the optimizer, its steps, zero_grad and the checkpoints' state dicts must not
    need it (torch.optim's wrappers import it on first use). Nor does `train` draw: matplotlib and the
    curves took 0.7 s; `report` draws them."""
    import subprocess
    import sys

    from conftest import write_image_folders

    write_image_folders(tmp_path / "images", {"cat": 10, "dog": 10})
    args = ["train", "--data", str(tmp_path / "images"), "--recipe", recipe, "--batch-size", "8",
            "--val-split", "4", "--epochs", "2", "--precision", "fp32", "--no-channels-last",
            "--out", str(tmp_path / "run")]
    code = (f"import sys; from cifarlab.cli import main; main({args!r}); "
            f"print([m in sys.modules for m in ('torch._dynamo', 'matplotlib')])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "[False, False]"
    assert (tmp_path / "run" / "summary.json").exists()
