"""The loader: a whole split held as one uint8 tensor on the training device, augmented per batch.

No per-image Python work and no worker processes: each batch is an index into the resident tensor,
a random translation and flip done as one gather on the batch, then a cast and normalisation. The
batch comes out channels_last, the layout the convolution kernels on CPU and GPU are fastest with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from cifarlab.data.sources import ImageSet


@dataclass(frozen=True)
class Augment:
    translate: int = 2  # pixels: random shift in [-translate, translate] on each axis, edges reflected
    flip: bool = True  # random horizontal flip


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, on the 0..1 scale."""
    x = images.float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def augment_batch(images: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random translate + flip of a uint8 NCHW batch as one gather; returns NHWC (channels_last order)."""
    n, _, h, w = images.shape
    device = images.device
    shift = torch.randint(-augment.translate, augment.translate + 1, (2, n, 1), generator=generator,
                          device=generator.device).to(device)
    rows = _reflect(torch.arange(h, device=device) + shift[0], h)  # [n, h]
    cols = torch.arange(w, device=device).expand(n, w)
    if augment.flip:
        flip = torch.rand(n, 1, generator=generator, device=generator.device).to(device) < 0.5
        cols = torch.where(flip, w - 1 - cols, cols)
    cols = _reflect(cols + shift[1], w)  # [n, w]
    batch = torch.arange(n, device=device)[:, None, None]
    return images[batch, :, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]


class TensorLoader:
    """Iterate (images, labels) batches of a split held on `device`; shuffled and augmented if asked.

    Each epoch draws a new order from the loader's own generator, so runs with the same seed see the
    same batches, and `state()`/`set_state()` let a resumed run continue the same sequence.
    """

    def __init__(self, data: ImageSet, batch_size: int, device: torch.device, mean: list[float],
                 std: list[float], *, shuffle: bool = False, augment: Augment | None = None,
                 drop_last: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        self.dataset = data  # named as torch's DataLoader names it, so len(loader.dataset) works
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        # scale and shift fold the /255 and the normalisation into one multiply-add
        std_t = torch.tensor(std, device=device)
        self.scale = (1 / (255 * std_t)).view(1, 3, 1, 1)
        self.shift = (-torch.tensor(mean, device=device) / std_t).view(1, 3, 1, 1)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator).to(self.device) if self.shuffle else None
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size] if order is not None else slice(start, start + self.batch_size)
            images, labels = self.images[index], self.labels[index]
            if self.augment is not None:
                images = augment_batch(images, self.augment, self.generator).permute(0, 3, 1, 2)
            else:
                images = images.contiguous(memory_format=torch.channels_last)
            # in float32 (scale and shift are float32, so a bf16/fp16 product would be promoted back
            # anyway), then cast: the batch comes out in the dtype asked for
            images = images.to(torch.float32) * self.scale + self.shift
            yield images.to(self.dtype).contiguous(memory_format=torch.channels_last), labels
