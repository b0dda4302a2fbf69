"""The device-resident loader (loader.py): layout, normalisation, order, and the batch augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cifarlab.data import loader as loader_module
from cifarlab.data.loader import Augment, TensorLoader, augment_batch, channel_stats
from cifarlab.data.sources import ImageSet

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _random_set(n: int = 203, num_classes: int = 5, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return ImageSet(images, labels, [f"c{i}" for i in range(num_classes)])


def _indexed_set(n: int = 203, num_classes: int = 7) -> ImageSet:
    """Every image constant: channel 0 and 1 hold its index (low, high byte), channel 2 its label.

    A constant image is its own translation and flip, so it can be identified after augmentation.
    """
    index = torch.arange(n)
    labels = (index * 3) % num_classes
    images = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0] = (index % 256).view(-1, 1, 1)
    images[:, 1] = (index // 256).view(-1, 1, 1)
    images[:, 2] = (labels * 30).view(-1, 1, 1)
    return ImageSet(images, labels, [f"c{i}" for i in range(num_classes)])


def _unnormalise(batch: torch.Tensor, mean, std) -> torch.Tensor:
    """Back to uint8 values (rounded) from a normalised float batch."""
    m = torch.tensor(mean, device=batch.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=batch.device).view(1, 3, 1, 1)
    return ((batch.float() * s + m) * 255).round().clamp(0, 255).to(torch.uint8)


def _identify(batch: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, label code) of each image of an _indexed_set batch, checking each image stayed constant."""
    raw = _unnormalise(batch, mean, std).cpu()
    flat = raw.flatten(2)
    assert torch.equal(flat.min(dim=2).values, flat.max(dim=2).values), "an image stopped being constant"
    values = flat[:, :, 0].long()
    return values[:, 0] + 256 * values[:, 1], values[:, 2] // 30


MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.15]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These batches are tiny: extra threads only add waiting (a lot of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- layout and normalisation ----------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("augment", [None, Augment()], ids=["plain", "augment"])
def test_batches_are_contiguous_nchw_float32(device, augment) -> None:
    """The model's layout takes it from there: an NCHW model must not be handed a channels_last batch,
    which would switch its convolutions to channels_last."""
    data = _random_set(70)
    loader = TensorLoader(data, 32, device, (MEAN, STD), augment=augment)
    shapes = []
    for images, labels in loader:
        assert images.dtype == torch.float32 and images.device.type == device.type
        assert images.is_contiguous()
        assert images.shape[1:] == (3, 32, 32)
        assert labels.dtype == torch.int64 and labels.device.type == device.type and len(labels) == len(images)
        shapes.append(len(images))
    assert shapes == [32, 32, 6] and len(loader) == 3
    assert len(loader.dataset) == 70


def test_a_channels_last_model_takes_an_nchw_batch_and_runs_channels_last() -> None:
    conv = torch.nn.Conv2d(3, 8, 3, padding=1).to(memory_format=torch.channels_last)
    images, _ = next(iter(TensorLoader(_random_set(8), 8, CPU, (MEAN, STD), augment=Augment())))
    assert conv(images).is_contiguous(memory_format=torch.channels_last)


def test_channel_stats() -> None:
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 0] = 255
    images[:2, 1] = 255
    mean, std = channel_stats(images)
    assert mean == pytest.approx([1.0, 0.5, 0.0])
    assert std[0] == pytest.approx(0.0) and std[2] == pytest.approx(0.0)
    assert std[1] == pytest.approx(torch.tensor([1.0] * 8 + [0.0] * 8).std().item())
    assert images.dtype == torch.uint8 and int(images[0, 0, 0, 0]) == 255  # input left alone


def test_normalised_to_zero_mean_unit_std() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.empty(300, 3, 32, 32, dtype=torch.uint8)
    for c, (low, high) in enumerate([(0, 256), (50, 120), (200, 256)]):  # very different channels
        images[:, c] = torch.randint(low, high, (300, 32, 32), generator=g, dtype=torch.uint8)
    data = ImageSet(images, torch.zeros(300, dtype=torch.int64), ["a", "b"])
    mean, std = channel_stats(images)
    batches = torch.cat([x for x, _ in TensorLoader(data, 64, CPU, (mean, std))])
    assert batches.shape == (300, 3, 32, 32)
    assert batches.mean(dim=(0, 2, 3)).tolist() == pytest.approx([0, 0, 0], abs=1e-4)
    assert batches.std(dim=(0, 2, 3)).tolist() == pytest.approx([1, 1, 1], abs=1e-4)


def test_normalisation_formula_exact() -> None:
    data = _random_set(9)
    images, _ = next(iter(TensorLoader(data, 9, CPU, (MEAN, STD))))
    expected = (data.images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(images, expected, atol=1e-5)


# --- order -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("augment", [None, Augment(), Augment(translate=4, flip=True)], ids=["plain", "aug", "aug4"])
def test_labels_stay_with_images_and_each_image_once_per_epoch(device, augment) -> None:
    data = _indexed_set(203)
    loader = TensorLoader(data, 32, device, (MEAN, STD), shuffle=True, augment=augment, seed=3)
    orders = []
    for _ in range(2):
        seen = []
        for images, labels in loader:
            index, label_code = _identify(images, MEAN, STD)
            assert torch.equal(label_code, labels.cpu())
            assert torch.equal(data.labels[index], labels.cpu())
            seen.append(index)
        order = torch.cat(seen)
        assert len(order) == 192 and len(set(order.tolist())) == 192  # the last partial batch dropped
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])  # a new order each epoch
    assert not torch.equal(orders[0], torch.arange(203))


def test_no_shuffle_keeps_order() -> None:
    data = _indexed_set(50)
    seen = torch.cat([_identify(x, MEAN, STD)[0] for x, _ in TensorLoader(data, 16, CPU, (MEAN, STD))])
    assert torch.equal(seen, torch.arange(50))


def test_a_shuffled_loader_drops_the_last_partial_batch_and_an_ordered_one_keeps_it() -> None:
    data = _indexed_set(203)
    loader = TensorLoader(data, 32, CPU, (MEAN, STD), shuffle=True)
    sizes = [len(labels) for _, labels in loader]
    assert sizes == [32] * 6 and len(loader) == 6
    exact = TensorLoader(_indexed_set(64), 32, CPU, (MEAN, STD), shuffle=True)
    assert [len(y) for _, y in exact] == [32, 32] and len(exact) == 2
    ordered = TensorLoader(data, 32, CPU, (MEAN, STD))
    assert [len(y) for _, y in ordered] == [32] * 6 + [11]
    small = TensorLoader(_indexed_set(20), 32, CPU, (MEAN, STD), shuffle=True)  # one batch: kept whole
    assert [len(y) for _, y in small] == [20]


def _epoch(loader: TensorLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_same_seed_same_batches() -> None:
    data = _random_set(100)
    make = lambda seed: TensorLoader(data, 16, CPU, (MEAN, STD), shuffle=True, augment=Augment(), seed=seed)  # noqa: E731
    a, b, c = make(7), make(7), make(8)
    first_a, first_b, first_c = _epoch(a), _epoch(b), _epoch(c)
    assert _same(first_a, first_b)
    assert not _same(first_a, first_c)
    assert _same(_epoch(a), _epoch(b))  # and the second epochs agree too


def test_state_resumes_the_sequence() -> None:
    data = _random_set(60)
    a = TensorLoader(data, 16, CPU, (MEAN, STD), shuffle=True, augment=Augment(), seed=1)
    _epoch(a)
    state = a.state()
    expected = _epoch(a)
    b = TensorLoader(data, 16, CPU, (MEAN, STD), shuffle=True, augment=Augment(), seed=99)
    b.set_state(state)
    assert _same(_epoch(b), expected)


def _flips_by_image(loader: TensorLoader, epoch: int) -> torch.Tensor:
    """Which images (by index) a pass of `loader` over `_ramp_set` flipped, as epoch `epoch`."""
    loader.set_epoch(epoch)
    flipped = torch.zeros(len(loader.dataset), dtype=torch.bool)
    for images, _ in loader:
        raw = _unnormalise(images, MEAN, STD).long()
        index = raw[:, 0, 0, 0] + 256 * raw[:, 1, 0, 0]
        flipped[index] = raw[:, 2, 0, 0] > raw[:, 2, 0, -1]  # the ramp runs right to left
    return flipped


def _ramp_set(n: int = 96) -> ImageSet:
    """Channels 0 and 1 hold each image's index; channel 2 rises left to right, so a flip shows."""
    index = torch.arange(n)
    images = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0], images[:, 1] = (index % 256).view(-1, 1, 1), (index // 256).view(-1, 1, 1)
    images[:, 2] = (torch.arange(32) * 8).view(1, 1, 32)
    return ImageSet(images, index % 3, ["a", "b", "c"])


def test_alternating_flips_mirror_each_image_the_other_way_every_other_epoch() -> None:
    augment = Augment(translate=0, flip=True, alternate_flip=True)
    loader = TensorLoader(_ramp_set(), 16, CPU, (MEAN, STD), shuffle=True, augment=augment, seed=3)
    first, second, third = (_flips_by_image(loader, epoch) for epoch in (1, 2, 3))
    assert 28 < int(first.sum()) < 68  # at random in the first epoch: about half
    assert torch.equal(second, ~first) and torch.equal(third, first)
    # resumed in epoch 2 (a new loader, as after a restart): the same flips
    again = TensorLoader(_ramp_set(), 16, CPU, (MEAN, STD), shuffle=True, augment=augment, seed=3)
    assert torch.equal(_flips_by_image(again, 2), second)
    random = TensorLoader(_ramp_set(), 16, CPU, (MEAN, STD), shuffle=True, augment=Augment(translate=0), seed=3)
    assert not torch.equal(_flips_by_image(random, 2), ~_flips_by_image(random, 1))


# --- augmentation ----------------------------------------------------------------------------------

def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_augment_identity(device) -> None:
    images = _random_set(40).images.to(device)
    out = augment_batch(images, Augment(translate=0, flip=False), _gen())
    assert out.shape == (40, 3, 32, 32) and out.dtype == torch.uint8
    assert torch.equal(out, images)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_flip_is_horizontal_only(device) -> None:
    images = _random_set(64).images.to(device)
    out = augment_batch(images, Augment(translate=0, flip=True), _gen(1))
    same = (out == images).flatten(1).all(dim=1)
    flipped = (out == images.flip(-1)).flatten(1).all(dim=1)
    assert torch.all(same ^ flipped)  # each image either untouched or mirrored left-right
    assert 10 < int(flipped.sum()) < 54  # about half
    assert not any(torch.equal(o, i.flip(-2)) for o, i in zip(out, images))  # never upside down


def _reflect_shift(image: np.ndarray, dy: int, dx: int, pad: int) -> np.ndarray:
    """image [C,H,W] moved so output[y, x] = image[reflect(y + dy), reflect(x + dx)]."""
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    h, w = image.shape[1:]
    return padded[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w]


@pytest.mark.parametrize("translate", [1, 2, 4])
def test_translate_within_range_with_reflect_padding(translate) -> None:
    images = _random_set(120).images
    out = augment_batch(images, Augment(translate=translate, flip=False), _gen(2)).numpy()
    shifts = set()
    for image, result in zip(images.numpy(), out):
        matches = [(dy, dx) for dy in range(-translate, translate + 1) for dx in range(-translate, translate + 1)
                   if np.array_equal(_reflect_shift(image, dy, dx, translate), result)]
        assert len(matches) == 1, "not a reflect-padded shift within range"
        shifts.add(matches[0])
    assert len(shifts) > (2 * translate + 1) ** 2 // 2  # the shifts are spread over the range
    assert any(dy != 0 for dy, _ in shifts) and any(dx != 0 for _, dx in shifts)


def test_translate_and_flip_together() -> None:
    images = _random_set(80).images
    out = augment_batch(images, Augment(translate=2, flip=True), _gen(3)).numpy()
    flips = 0
    for image, result in zip(images.numpy(), out):
        candidates = [(f, dy, dx) for f in (False, True) for dy in range(-2, 3) for dx in range(-2, 3)
                      if np.array_equal(_reflect_shift(image[:, :, ::-1] if f else image, dy, dx, 2), result)]
        assert len(candidates) == 1
        flips += candidates[0][0]
    assert 10 < flips < 70


def test_augment_is_seeded() -> None:
    images = _random_set(30).images
    a = augment_batch(images, Augment(), _gen(5))
    b = augment_batch(images, Augment(), _gen(5))
    c = augment_batch(images, Augment(), _gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_no_augmentation_without_augment(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("augment_batch called with augment=None")

    monkeypatch.setattr(loader_module, "augment_batch", refuse)
    data = _random_set(50)
    loader = TensorLoader(data, 16, CPU, (MEAN, STD), shuffle=False, augment=None)
    out = torch.cat([x for x, _ in loader])
    assert torch.equal(_unnormalise(out, MEAN, STD), data.images)


def test_augmentation_used_when_asked() -> None:
    data = _random_set(50)
    plain = torch.cat([x for x, _ in TensorLoader(data, 50, CPU, (MEAN, STD))])
    augmented = torch.cat([x for x, _ in TensorLoader(data, 50, CPU, (MEAN, STD), augment=Augment())])
    assert not torch.equal(plain, augmented)
    # still the same images, moved: per-image means barely change under a small shift or a flip
    assert torch.allclose(plain.mean(dim=(1, 2, 3)), augmented.mean(dim=(1, 2, 3)), atol=0.1)


def test_loader_leaves_the_dataset_alone() -> None:
    data = _random_set(40)
    before = data.images.clone()
    for _ in TensorLoader(data, 16, CPU, (MEAN, STD), shuffle=True, augment=Augment()):
        pass
    assert torch.equal(data.images, before)
