"""Batched augmentations beyond translate+flip: a RandAugment-style policy, cutout, mixup and cutmix.

Each works on a whole batch with tensor ops (no per-image Python loop) and draws its randomness from
the `torch.Generator` it is given (the loader's own), on that generator's device, so a run's
augmentation depends only on its seed. Cutout draws and masks on the device: a GPU never waits for the
host. RandAugment's grouping by op and mixup/cutmix's weight are host decisions: on a GPU they read
back a few numbers per batch.

Mixup and cutmix return two label vectors and the mixing weight; `mixed_cross_entropy` (in the
engine) is the one loss that takes them, and equals plain cross-entropy when nothing was mixed.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch


@functools.cache
def _ops() -> dict[str, tuple[Callable[[torch.Tensor, float], torch.Tensor], float]]:
    """name -> (op(images uint8 [n, 3, h, w], signed magnitude), largest magnitude), as torchvision's
    RandAugment. torchvision is imported here, on first use: most runs never need it, and it costs
    about a second of every start-up otherwise."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    nearest = InterpolationMode.NEAREST

    def affine(images: torch.Tensor, **kwargs) -> torch.Tensor:
        args = {"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0], **kwargs}
        return TF.affine(images, interpolation=nearest, center=[0, 0], **args)

    return {
        "identity": (lambda x, v: x, 0.0),
        "shear_x": (lambda x, v: affine(x, shear=[math.degrees(math.atan(v)), 0.0]), 0.3),
        "shear_y": (lambda x, v: affine(x, shear=[0.0, math.degrees(math.atan(v))]), 0.3),
        "translate_x": (lambda x, v: affine(x, translate=[int(v * x.shape[-1]), 0]), 150 / 331),
        "translate_y": (lambda x, v: affine(x, translate=[0, int(v * x.shape[-2])]), 150 / 331),
        "rotate": (lambda x, v: TF.rotate(x, v, interpolation=nearest), 30.0),
        "brightness": (lambda x, v: TF.adjust_brightness(x, 1 + v), 0.9),
        "color": (lambda x, v: TF.adjust_saturation(x, 1 + v), 0.9),
        "contrast": (lambda x, v: TF.adjust_contrast(x, 1 + v), 0.9),
        "sharpness": (lambda x, v: TF.adjust_sharpness(x, 1 + v), 0.9),
        "posterize": (lambda x, v: TF.posterize(x, 8 - round(abs(v))), 4.0),
        "solarize": (lambda x, v: TF.solarize(x, 255 * (1 - abs(v))), 1.0),
        "autocontrast": (lambda x, v: TF.autocontrast(x), 0.0),
        "equalize": (lambda x, v: TF.equalize(x), 0.0),
    }


MAX_LEVEL = 30  # magnitudes run 0..30, as in the RandAugment paper and torchvision


def rand_augment(images: torch.Tensor, ops: int, magnitude: int, generator: torch.Generator) -> torch.Tensor:
    """RandAugment on a uint8 batch: `ops` rounds, each applying one uniformly drawn op per image.

    Images drawing the same op are transformed together (one call per op and sign per round), so a
    round costs 14-28 batched calls whatever the batch size. Magnitude is fixed (`magnitude`/30 of
    each op's range), the sign random per image, as torchvision does it per image.
    """
    table = _ops()
    names = list(table)
    out = images
    for _ in range(ops):
        choice = torch.randint(len(names), (len(images),), generator=generator, device=generator.device)
        negative = torch.rand(len(images), generator=generator, device=generator.device) < 0.5
        out = out.clone()
        for k, name in enumerate(names):
            op, largest = table[name]
            for sign in (1.0, -1.0):
                chosen = torch.nonzero((choice == k) & (negative == (sign < 0))).flatten().to(images.device)
                if len(chosen):
                    out[chosen] = op(out[chosen], sign * largest * magnitude / MAX_LEVEL)
    return out


def _boxes(n: int, h: int, w: int, box_h: torch.Tensor, box_w: torch.Tensor,
           generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Per-image boxes with uniformly drawn centres, clipped to the image: (top, bottom, left, right)."""
    cy = torch.randint(h, (n,), generator=generator, device=generator.device)
    cx = torch.randint(w, (n,), generator=generator, device=generator.device)
    return ((cy - box_h // 2).clamp(0, h), (cy + box_h - box_h // 2).clamp(0, h),
            (cx - box_w // 2).clamp(0, w), (cx + box_w - box_w // 2).clamp(0, w))


def _box_mask(top: torch.Tensor, bottom: torch.Tensor, left: torch.Tensor, right: torch.Tensor, h: int, w: int,
              device: torch.device) -> torch.Tensor:
    rows, cols = torch.arange(h, device=top.device)[None, :], torch.arange(w, device=top.device)[None, :]
    inside = (((rows >= top[:, None]) & (rows < bottom[:, None]))[:, :, None]
              & ((cols >= left[:, None]) & (cols < right[:, None]))[:, None, :])
    return inside[:, None].to(device)  # [n, 1, h, w]


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """DeVries & Taylor (2017): zero a size x size square (the mean, after normalisation) per image,
    its centre anywhere in the image, so it may be partly outside."""
    n, _, h, w = images.shape
    box = torch.full((n,), size, device=generator.device)
    mask = _box_mask(*_boxes(n, h, w, box, box, generator), h, w, images.device)
    return images.masked_fill(mask, 0.0)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw, seeded from `generator` (torch's Beta takes no generator)."""
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def mixup(images: torch.Tensor, labels: torch.Tensor, alpha: float,
          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Zhang et al. (2018): blend each image with another of the batch; returns (images, labels,
    the partners' labels, weight of `labels`). The weight is folded to >= 0.5, so `labels` is always the
    majority and training accuracy against it stays meaningful."""
    lam = _beta(alpha, generator)
    lam = max(lam, 1 - lam)
    partner = torch.randperm(len(images), generator=generator, device=generator.device).to(images.device)
    return images * lam + images[partner] * (1 - lam), labels, labels[partner], lam


def cutmix(images: torch.Tensor, labels: torch.Tensor, alpha: float,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Yun et al. (2019): paste one box (area 1 - lam, the same box for the batch) from a partner
    image; the weight is the area actually kept after clipping to the image."""
    n, _, h, w = images.shape
    lam = _beta(alpha, generator)
    lam = max(lam, 1 - lam)
    cut = math.sqrt(1 - lam)
    box_h, box_w = (torch.tensor([int(size * cut)], device=generator.device) for size in (h, w))
    top, bottom, left, right = _boxes(1, h, w, box_h, box_w, generator)
    partner = torch.randperm(n, generator=generator, device=generator.device).to(images.device)
    mask = _box_mask(top, bottom, left, right, h, w, images.device)
    mixed = torch.where(mask, images[partner], images)
    kept = 1 - float((bottom - top) * (right - left)) / (h * w)
    return mixed, labels, labels[partner], kept


def mix_batch(images: torch.Tensor, labels: torch.Tensor, mixup_alpha: float, cutmix_alpha: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Mixup or cutmix, whichever is on; with both on, one of the two per batch at even odds (as timm)."""
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or bool(torch.rand(1, generator=generator,
                                                                             device=generator.device) < 0.5))
    if use_cutmix:
        return cutmix(images, labels, cutmix_alpha, generator)
    return mixup(images, labels, mixup_alpha, generator)
