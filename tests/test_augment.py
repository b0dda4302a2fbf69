"""The batched augmentations, the mixed loss, the weight EMA, and a run that uses them all."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cifarlab.cli import main
from cifarlab.data import Augment, TensorLoader
from cifarlab.data.augment import cutmix, cutout, mix_batch, mixup, rand_augment
from cifarlab.data.sources import ImageSet
from cifarlab.ema import WeightEMA
from cifarlab.engine import mixed_cross_entropy


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rand_augment_is_uint8_and_reproducible() -> None:
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    a, b = rand_augment(images, 2, 9, gen(1)), rand_augment(images, 2, 9, gen(1))
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    assert not torch.equal(a, images)


def test_cutout_zeroes_one_square_per_image() -> None:
    out = cutout(torch.ones(16, 3, 32, 32), 8, gen())
    zeros = (out == 0).all(dim=1).sum(dim=(1, 2))  # per image, pixels zeroed in every channel
    assert ((zeros > 0) & (zeros <= 64)).all() and (zeros == 64).any()  # clipped at the edges, else 8x8


def test_mixup_and_cutmix_weights() -> None:
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    mixed, a, b, lam = mixup(images, labels, 1.0, gen())
    assert 0.5 <= lam <= 1 and torch.equal(a, labels) and sorted(b.tolist()) == list(range(8))
    partner = [labels.tolist().index(x) for x in b.tolist()]
    assert torch.allclose(mixed, lam * images + (1 - lam) * images[partner], atol=1e-6)
    mixed, a, b, lam = cutmix(images, labels, 1.0, gen(3))
    kept = (mixed == images).all(dim=1).float().mean(dim=(1, 2))  # fraction of each image kept
    moved = b != a
    assert torch.allclose(kept[moved], torch.full_like(kept[moved], lam), atol=1e-6)
    both = {mix_batch(images, labels, 0.2, 1.0, gen(s))[3] for s in range(6)}
    assert len(both) == 6


def test_mixed_loss_is_cross_entropy_with_mixed_soft_labels() -> None:
    output, a, b = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([4, 3, 2, 1, 0, 1])
    soft = 0.7 * F.one_hot(a, 5).float() + 0.3 * F.one_hot(b, 5).float()
    assert torch.allclose(mixed_cross_entropy(output, a, b, 0.7), F.cross_entropy(output, soft))
    assert torch.allclose(mixed_cross_entropy(output, a), F.cross_entropy(output, a))


def test_loader_with_extras_is_reproducible_and_resumes_exactly() -> None:
    data = ImageSet(torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8), torch.arange(40) % 4, list("abcd"))
    augment = Augment(translate=2, randaugment=1, cutout=4, mixup=0.2, cutmix=1.0)
    make = lambda: TensorLoader(data, 8, torch.device("cpu"), ([0.5] * 3, [0.25] * 3), shuffle=True,  # noqa: E731
                                augment=augment, seed=2)
    first, second = list(make()), list(make())
    assert all(len(batch) == 4 for batch in first)  # (images, labels, partner labels, weight)
    assert all(torch.equal(x[0], y[0]) and x[3] == y[3] for x, y in zip(first, second))
    resumed = make()
    resumed.resume_at(resumed.state(), 3)  # skip 3 batches: the rest must be exactly the same
    rest = list(resumed)
    assert len(first) == 5 and len(rest) == 2
    for x, y in zip(first[3:], rest):
        assert torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) and x[3] == y[3]


def test_weight_ema_follows_the_weights_and_its_state_is_plain() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.5)
    before = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)  # the warm-up decay at the first update is min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * before + (1 - d) * model[0].weight)
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    other = WeightEMA(model, decay=0.9)
    other.load_state_dict(torch.load(buffer, weights_only=True))  # what a resume checkpoint does
    assert other.updates == 1 and other.decay == 0.5
    assert torch.equal(other.module[0].weight, ema.module[0].weight)


def test_train_with_every_option_saves_the_ema_weights(tmp_path: Path, image_folder_writer, capsys,
                                                       monkeypatch) -> None:
    import cifarlab.trainer as trainer_module

    runs = []
    real_build = trainer_module.build_run
    monkeypatch.setattr(trainer_module, "build_run", lambda *args: runs.append(real_build(*args)) or runs[-1])
    root = tmp_path / "images"
    image_folder_writer(root, {name: 12 for name in ("cat", "dog")})
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--model", "resnet20", "--epochs", "1", "--batch-size", "8",
                 "--val-split", "8", "--out", str(out), "--optimizer", "sgd", "--lr", "0.05", "--schedule", "cosine",
                 "--warmup-epochs", "0.5", "--weight-decay", "5e-4", "--label-smoothing", "0.1", "--clip-grad", "1",
                 "--ema", "0.9", "--randaugment", "2", "--cutout", "8", "--mixup", "0.2", "--cutmix", "1"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["ema"] == 0.9 and config["cutmix"] == 1.0 and config["clip_grad"] == 1.0
    (run,) = runs
    saved = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    averaged, trained = run.step.ema.module.state_dict(), run.model.state_dict()
    assert saved.keys() == averaged.keys() == trained.keys()
    assert all(torch.equal(saved[k], averaged[k]) for k in saved)  # model.pt holds the EMA weights
    assert not all(torch.equal(saved[k], trained[k]) for k in saved)  # not the last trained ones
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0  # the EMA weights were the ones evaluated
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(summary["accuracy"])


@pytest.mark.parametrize("flag", [["--ema", "1.5"], ["--cutout", "-1"], ["--mixup", "-0.1"], ["--clip-grad", "-1"]])
def test_bad_training_options_are_clean_errors(flag: list[str], tmp_path: Path, capsys) -> None:
    assert main(["train", "--data", str(tmp_path), *flag]) == 2
    assert f"{flag[0]} {flag[1]}" in capsys.readouterr().err


def test_lookahead_pulls_the_weights_to_their_slow_average_and_ends_on_it() -> None:
    from cifarlab.ema import Lookahead

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    look = Lookahead(model, total_steps=10, every=5)
    for step in range(1, 11):
        with torch.no_grad():
            model.weight.add_(1.0)  # a "training step"
        fast = model.weight.item()
        look.update(model)
        if step == 5:  # decay 0.95**5 * (5/10)**3: the slow weight moves most of the way, the fast one follows
            decay = 0.95 ** 5 * 0.5 ** 3
            assert model.weight.item() == pytest.approx(decay * 0.0 + (1 - decay) * fast)
        elif step == 10:  # the last step: the model holds the slow weights, not the last fast ones
            assert model.weight.item() == pytest.approx(look.slow[0].item()) and model.weight.item() < fast
        else:
            assert model.weight.item() == fast
    state = look.state_dict()
    again = Lookahead(model, total_steps=1)
    again.load_state_dict(state)
    assert again.steps == 10 and again.total_steps == 10 and torch.equal(again.slow[0], look.slow[0])
