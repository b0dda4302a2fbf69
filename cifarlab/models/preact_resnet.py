"""Pre-activation ResNet-18 for 32x32 images (He et al., 2016, "Identity Mappings in Deep Residual
Networks"), the variant the CIFAR literature trains: a 3x3 stem with no pooling, four stages of two
blocks at 64/128/256/512 channels, 1x1 projection shortcuts where the shape changes. 11.2M parameters.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.models.registry import register_model


class PreActBlock(nn.Module):
    """BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, plus the shortcut; no activation after the sum."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # the projection takes the pre-activated input, as in the paper's full pre-activation design
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), widths: Sequence[int] = (64, 128, 256, 512),
                 num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        stages, cin = [], widths[0]
        for i, (count, width) in enumerate(zip(blocks, widths)):
            layers = [PreActBlock(cin, width, stride=1 if i == 0 else 2)]
            layers += [PreActBlock(width, width) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(cin)  # the final BN-ReLU a pre-activation net needs before pooling
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stages(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model
def preact_resnet18(**kwargs) -> nn.Module:
    """Pre-activation ResNet-18, 32x32 variant (11.2M; ~95% on CIFAR-10 with the `resnet18` recipe)."""
    return PreActResNet(**kwargs)
