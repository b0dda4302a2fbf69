"""Wide ResNets (Zagoruyko & Komodakis, 2016): WRN-d-k has (d-4)/6 pre-activation blocks per stage at
16k/32k/64k channels, 1x1 projection shortcuts where the shape changes, optional dropout between the
two convolutions. wrn16_8 has 11.0M parameters, wrn28_10 36.5M (the paper's table).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.models.registry import register_model


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(out)))))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 10, dropout: float = 0.0, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise TypeError(f"depth {depth}: must be 6n+4 (16, 22, 28, 40, ...)")
        n = (depth - 4) // 6
        widths = [16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        stages, cin = [], 16
        for i, width in enumerate(widths):
            layers = [WideBlock(cin, width, 1 if i == 0 else 2, dropout)]
            layers += [WideBlock(width, width, 1, dropout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stages(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model
def wrn16_8(**kwargs) -> nn.Module:
    """Wide ResNet 16-8 (11.0M; paper: 4.81% error on CIFAR-10)."""
    return WideResNet(16, 8, **kwargs)


@register_model
def wrn28_10(**kwargs) -> nn.Module:
    """Wide ResNet 28-10 (36.5M; paper: 4.17% error on CIFAR-10 with dropout 0.3)."""
    return WideResNet(28, 10, **kwargs)
