"""The speedrun network, after airbench (Keller Jordan, 2024): a frozen whitening stem and three
conv blocks with BatchNorm and GELU. Written here from the published design, not copied.

- The stem is a 2x2 convolution whose filters are the training patches' PCA basis scaled to unit
  variance, and their negatives (so GELU keeps both signs). It is set from data by
  `init_from_data` and not trained: decorrelated inputs make the first steps count.
- BatchNorm scales are frozen at 1 (only the shifts learn), and each conv starts as a partial identity
  (Dirac), which acts like a residual connection without the extra memory traffic.
- The logits are scaled down (1/9) before the softmax, which with label smoothing keeps the early
  high learning rates stable.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from cifarlab.models.registry import register_model


def _conv(cin: int, cout: int, kernel_size: int = 3, padding: int | str = "same", bias: bool = False) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel_size=kernel_size, padding=padding, bias=bias)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


def _norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    norm.weight.requires_grad_(False)  # scale frozen at 1
    return norm


# GELU as airbench; ReLU costs a third of it on a CPU (bf16: about 2 against 7 ms forward + backward for
# 4M activations) for about half a point at fast75's size (docs/notes.md)
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class ConvBlock(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU (pooling early halves the second conv's cost).

    With `convs=3` (airbench96) a third conv -> BN -> GELU follows, and the last two are bridged by a
    residual connection from the pooled activation."""

    def __init__(self, cin: int, cout: int, convs: int = 2, activation: str = "gelu") -> None:
        super().__init__()
        self.conv1, self.pool, self.norm1 = _conv(cin, cout), nn.MaxPool2d(2), _norm(cout)
        self.conv2, self.norm2 = _conv(cout, cout), _norm(cout)
        self.conv3, self.norm3 = (_conv(cout, cout), _norm(cout)) if convs == 3 else (None, None)
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.norm1(self.pool(self.conv1(x))))
        y = self.activation(self.norm2(self.conv2(x)))
        if self.conv3 is None:
            return y
        return self.activation(self.norm3(self.conv3(y))) + x


class FastNet(nn.Module):
    def __init__(self, widths: Sequence[int] = (64, 256, 256), num_classes: int = 10, whiten_kernel: int = 2,
                 logit_scale: float = 1 / 9, whiten_stride: int = 1, train_whiten_bias: bool = True,
                 block_convs: int = 2, activation: str = "gelu") -> None:
        super().__init__()
        if block_convs not in (2, 3):
            raise ValueError(f"block_convs must be 2 or 3, not {block_convs}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
        whiten_width = 2 * 3 * whiten_kernel ** 2
        # stride 2 halves the resolution every later layer runs at: a quarter of the FLOPs, for CPUs
        self.whiten = nn.Conv2d(3, whiten_width, kernel_size=whiten_kernel, stride=whiten_stride, padding=0,
                                bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)  # as airbench: the whitened features start centred
        # frozen too, the stem needs no gradient at all: autograd skips its backward (cheaper steps)
        self.whiten.bias.requires_grad_(train_whiten_bias)
        blocks, cin = [], whiten_width
        for width in widths:
            blocks.append(ConvBlock(cin, width, block_convs, activation))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes, bias=False)
        self.activation = ACTIVATIONS[activation]()
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten `images` (normalised float, N x 3 x H x W; a few thousand suffice)."""
        k, s, images = self.whiten.kernel_size[0], self.whiten.stride[0], images.float()
        h, w = images.shape[2] - k + 1, images.shape[3] - k + 1
        # every k x k patch the stem sees (at its stride) as a column of (channel, row, column) values: one
        # row per offset in the patch, copied from slices (3x faster than unfold + permute)
        offsets = torch.stack([images[:, c, dy:dy + h:s, dx:dx + w:s] for c in range(3) for dy in range(k)
                               for dx in range(k)]).reshape(3 * k * k, -1)
        covariance = offsets @ offsets.T / offsets.shape[1]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, 3, k, k)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.activation(self.whiten(x)))
        # global max-pool. Not torch.amax: its backward splits the gradient among the elements equal to the
        # max, and torch.compile in bf16 recomputes them at another precision, finds none, and divides by
        # zero (NaN gradients from the first step); max-pooling's backward follows the recorded index
        x = nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.logit_scale


@register_model
def fast_net(**kwargs) -> nn.Module:
    """airbench94's network (widths 64/256/256): 94% on CIFAR-10 in about 10 epochs."""
    return FastNet(**kwargs)
