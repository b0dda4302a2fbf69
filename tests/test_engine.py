"""The notebook-style API: train/test generators, fit's history and curves, no per-batch host reads."""
import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402

import cifarlab  # noqa: E402  (its `test` would be collected by pytest if imported by name)
from cifarlab import CIFAR10CNN, TensorLoader, fit, plot_metric_curve  # noqa: E402
from cifarlab.data import ImageSet  # noqa: E402
from cifarlab.ema import WeightEMA  # noqa: E402
from cifarlab.engine import Step, evaluate, train_one_epoch, train_step  # noqa: E402


def _separable_loader(n: int = 256, batch_size: int = 32, shuffle: bool = True) -> TensorLoader:
    """Two classes a small CNN can tell apart at once: dark vs bright images."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    images = (torch.rand(n, 3, 32, 32, generator=generator) * 100 + labels.view(-1, 1, 1, 1) * 150).to(torch.uint8)
    data = ImageSet(images, labels, ["dark", "bright"])
    return TensorLoader(data, batch_size, torch.device("cpu"), ([0.5] * 3, [0.3] * 3), shuffle=shuffle)


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
    sums = train_one_epoch(Step(model, optimizer, torch.device("cpu")), loader)
    assert sums.batches == len(loader) and not calls
    sums.means()
    assert len(calls) == 2  # the loss and accuracy sums, once


def test_fit_learns_and_returns_history(capsys) -> None:
    model, loader = _model(), _separable_loader()
    val = _separable_loader(shuffle=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = fit(model, optimizer, 3, torch.device("cpu"), loader, val)
    assert [r.epoch for r in history.records] == [1, 2, 3]
    assert len(history.batch_loss) == len(history.batch_acc) == 3 * len(loader)  # the notebook's per-batch curve
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


def test_fit_with_an_ema_evaluates_an_average_that_moved() -> None:
    model, loader = _model(), _separable_loader()
    ema = WeightEMA(model, 0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    evaluated = []
    real_evaluate = cifarlab.engine.evaluate
    cifarlab.engine.evaluate = lambda m, *a, **k: evaluated.append(m) or real_evaluate(m, *a, **k)
    try:
        history = fit(model, torch.optim.Adam(model.parameters(), lr=3e-3), 2, torch.device("cpu"), loader,
                      _separable_loader(shuffle=False), ema=ema)
    finally:
        cifarlab.engine.evaluate = real_evaluate
    assert evaluated and all(m is ema.module for m in evaluated)
    assert ema.updates == 2 * len(loader)
    moved = [k for k, v in ema.module.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert moved and history.records[-1].val_acc > 0.9


def test_fp16_training_scales_the_loss_and_unscales_before_clipping() -> None:
    model, loader = _model(), _separable_loader()
    step = Step(model, torch.optim.SGD(model.parameters(), lr=1e-2), torch.device("cpu"), amp_dtype=torch.float16,
                clip_grad=1.0)
    assert step.scaler.is_enabled()
    assert not Step(model, step.optimizer, torch.device("cpu"), amp_dtype=torch.bfloat16).scaler.is_enabled()
    scaled, unscaled = [], []
    real_scale, real_unscale = step.scaler.scale, step.scaler.unscale_
    step.scaler.scale = lambda loss: scaled.append(1) or real_scale(loss)
    step.scaler.unscale_ = lambda optimizer: unscaled.append(1) or real_unscale(optimizer)
    before = [p.clone() for p in model.parameters()]
    for batch in loader:
        loss, _ = train_step(step, batch)
    assert len(scaled) == len(unscaled) == len(loader)
    assert torch.isfinite(loss) and step.scaler.get_scale() > 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_tta_reusing_the_plain_evaluation_matches_computing_it_again() -> None:
    """The final TTA takes the last epoch's unaugmented probabilities instead of a sixth forward pass."""
    model, loader = _model(), _separable_loader(n=200, batch_size=64, shuffle=False)
    plain = evaluate(model, loader, torch.device("cpu"))
    for level in (1, 2):
        again = evaluate(model, loader, torch.device("cpu"), tta=level)
        reused = evaluate(model, loader, torch.device("cpu"), tta=level, plain=plain)
        assert torch.allclose(reused.probabilities, again.probabilities, atol=1e-6)
        assert reused.accuracy == again.accuracy and abs(reused.loss - again.loss) < 1e-6
    assert not torch.allclose(evaluate(model, loader, torch.device("cpu"), tta=2).probabilities, plain.probabilities)


def test_tta_on_a_share_changes_only_the_least_confident_images() -> None:
    """--tta-share 0.25: a quarter of each batch, the lowest top probabilities, gets full TTA's
    probabilities; every other image keeps exactly its plain ones."""
    model, loader = _model(), _separable_loader(n=200, batch_size=64, shuffle=False)
    plain = evaluate(model, loader, torch.device("cpu"))
    full = evaluate(model, loader, torch.device("cpu"), tta=2, plain=plain)
    part = evaluate(model, loader, torch.device("cpu"), tta=2, plain=plain, tta_share=0.25)
    chosen = torch.zeros(200, dtype=torch.bool)
    for start in range(0, 200, 64):
        confidence = plain.probabilities[start:start + 64].amax(dim=1)
        chosen[start + confidence.topk(-(-len(confidence) // 4), largest=False).indices] = True
    assert 0 < chosen.sum() < 200
    expected = torch.where(chosen[:, None], full.probabilities, plain.probabilities)
    assert torch.allclose(part.probabilities, expected, atol=1e-6)
    assert not torch.allclose(part.probabilities, plain.probabilities, atol=1e-6)
