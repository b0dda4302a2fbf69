"""He et al. (2015), section 4.2: the CIFAR ResNets of depth 6n+2 (resnet20 ... resnet110), and the
paper's plain nets of the same layout without shortcuts (plain20 ... plain56), its Fig. 6 comparison.

Three stages of n basic blocks at 16, 32 and 64 channels (32x32, 16x16, 8x8), global average pooling
and one linear layer. Shortcuts are the paper's option A: identity, and where a stage halves the
resolution and doubles the width, a strided subsample padded with zero channels, so shortcuts add
no parameters and the counts match the paper's table 6 (0.27M, 0.46M, 0.66M, 0.85M, 1.7M).
Built as torchvision builds its ResNets: a block class, a stage maker, and one builder per depth.
A plain net is the same network with `shortcut=False`: each block's output is ReLU(BN(conv2(...))) alone,
so it has exactly the ResNet's parameters and differs only in the missing identity path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.models.registry import register_model


class ShortcutA(nn.Module):
    """Option A: subsample by `stride` and pad the new channels with zeros (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut (none in a plain net), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (None if not shortcut else ShortcutA(cin, cout, stride) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out if self.shortcut is None else out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64),
                 shortcut: bool = True) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise TypeError(f"depth {depth}: must be 6n+2 (20, 32, 44, 56, 110, ...)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, width in enumerate(widths):
            blocks = [BasicBlock(cin, width, 1 if i == 0 else 2, shortcut)]
            blocks += [BasicBlock(width, width, 1, shortcut) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # He initialisation, as the paper
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model
def resnet20(**kwargs) -> nn.Module:
    """He et al.'s CIFAR ResNet-20 (0.27M; paper: 8.75% error)."""
    return CifarResNet(20, **kwargs)


@register_model
def resnet32(**kwargs) -> nn.Module:
    """He et al.'s CIFAR ResNet-32 (0.46M; paper: 7.51% error)."""
    return CifarResNet(32, **kwargs)


@register_model
def resnet44(**kwargs) -> nn.Module:
    """He et al.'s CIFAR ResNet-44 (0.66M; paper: 7.17% error)."""
    return CifarResNet(44, **kwargs)


@register_model
def resnet56(**kwargs) -> nn.Module:
    """He et al.'s CIFAR ResNet-56 (0.85M; paper: 6.97% error)."""
    return CifarResNet(56, **kwargs)


@register_model
def resnet110(**kwargs) -> nn.Module:
    """He et al.'s CIFAR ResNet-110 (1.7M; paper: 6.43% error)."""
    return CifarResNet(110, **kwargs)


@register_model
def plain20(**kwargs) -> nn.Module:
    """He et al.'s CIFAR plain-20: ResNet-20 without shortcuts (0.27M; paper Fig. 6)."""
    return CifarResNet(20, shortcut=False, **kwargs)


@register_model
def plain32(**kwargs) -> nn.Module:
    """He et al.'s CIFAR plain-32: ResNet-32 without shortcuts (0.46M; paper Fig. 6)."""
    return CifarResNet(32, shortcut=False, **kwargs)


@register_model
def plain44(**kwargs) -> nn.Module:
    """He et al.'s CIFAR plain-44: ResNet-44 without shortcuts (0.66M; paper Fig. 6)."""
    return CifarResNet(44, shortcut=False, **kwargs)


@register_model
def plain56(**kwargs) -> nn.Module:
    """He et al.'s CIFAR plain-56: ResNet-56 without shortcuts (0.85M; training error above plain-20's)."""
    return CifarResNet(56, shortcut=False, **kwargs)
