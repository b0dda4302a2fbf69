"""The notebook-style API: train/test generators, fit's history and curves, no per-batch host reads."""
import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

import cifarlab  # noqa: E402  (its `test` would be collected by pytest if imported by name)
from cifarlab import CIFAR10CNN, TensorLoader, fit, plot_metric_curve  # noqa: E402
from cifarlab.data import ImageSet  # noqa: E402
from cifarlab.engine import evaluate, train_one_epoch  # noqa: E402


def _separable_loader(n: int = 256, batch_size: int = 32, shuffle: bool = True) -> TensorLoader:
    """Two classes a small CNN can tell apart at once: dark vs bright images."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = (torch.rand(n, 3, 32, 32, generator=generator) * 100 + labels.view(-1, 1, 1, 1) * 150).to(torch.uint8)
    data = ImageSet(images, labels, ["dark", "bright"])
    return TensorLoader(data, batch_size, torch.device("cpu"), [0.5] * 3, [0.3] * 3, shuffle=shuffle)


def _model() -> CIFAR10CNN:
    torch.manual_seed(0)
    return CIFAR10CNN(channels=(8, 8, 16, 16), hidden=32, num_classes=2)


def test_train_yields_detached_tensors_per_batch() -> None:
    model, loader = _model(), _separable_loader()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = list(cifarlab.train(model, torch.device("cpu"), loader, optimizer, epoch=1))
    assert len(steps) == len(loader)
    loss, accuracy = steps[0]
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and not loss.requires_grad
    assert 0 <= float(accuracy) <= 1


def test_train_never_reads_values_per_batch(monkeypatch) -> None:
    """`.item()` per batch would make a GPU wait; the epoch loop must read its sums only at the end."""
    calls = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or real_item(self))
    model, loader = _model(), _separable_loader()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)  # Adam on CPU reads its step count itself
    train_one_epoch(model, torch.device("cpu"), loader, optimizer)
    assert len(calls) <= 2  # the loss and accuracy sums, once


def test_fit_learns_and_returns_history(capsys) -> None:
    model, loader = _model(), _separable_loader()
    val = _separable_loader(shuffle=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = fit(model, optimizer, 3, torch.device("cpu"), loader, val, plot=True)
    assert [r.epoch for r in history.records] == [1, 2, 3]
    assert history.records[-1].val_acc > 0.95
    assert history.records[-1].train_loss < history.records[0].train_loss
    assert "epoch 3/3" in capsys.readouterr().out


def test_test_generator_matches_evaluate(capsys) -> None:
    model, loader = _model(), _separable_loader(shuffle=False)
    (loss, accuracy), = list(cifarlab.test(model, torch.device("cpu"), loader))
    result = evaluate(model, loader, torch.device("cpu"))
    assert abs(loss - result.loss) < 1e-6 and accuracy == result.accuracy
    assert result.n == 256 and result.probabilities.shape == (256, 2)
    assert "Test set: Average loss" in capsys.readouterr().out


def test_plot_metric_curve_draws_both_lines() -> None:
    import matplotlib.pyplot as plt

    ax = plot_metric_curve([1.0, 0.8, 0.6], [0.9, 0.7, 0.65], 3, "Loss", show=False)
    assert [line.get_label() for line in ax.get_lines()] == ["train", "validation"]
    plt.close("all")
