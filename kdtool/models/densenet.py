"""CIFAR DenseNet-BC (kuangliu/pytorch-cifar).

Growth rate 32, compression 0.5, a 3x3 stem of 2*growth channels and no
max-pool; three transitions take 32x32 inputs down to 4x4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdtool.models._registry import register_model


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1 (4*growth) then BN-ReLU-conv3x3 (growth); output joins the input."""

    def __init__(self, in_planes: int, growth_rate: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    def __init__(
        self,
        num_blocks: Sequence[int],
        growth_rate: int = 32,
        reduction: float = 0.5,
        num_classes: int = 10,
        in_chans: int = 3,
    ):
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError("DenseNet needs exactly four dense blocks")
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_chans, planes, 3, padding=1, bias=False)
        # dense1..dense4, with a compressing transition (trans1..trans3) after all but the last.
        for i, n in enumerate(num_blocks, start=1):
            self.add_module(f"dense{i}", self._make_dense(planes, growth_rate, n))
            planes += n * growth_rate
            if i < 4:
                out_planes = math.floor(planes * reduction)
                self.add_module(f"trans{i}", Transition(planes, out_planes))
                planes = out_planes
        self.bn = nn.BatchNorm2d(planes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    @staticmethod
    def _make_dense(in_planes: int, growth_rate: int, num_blocks: int) -> nn.Sequential:
        return nn.Sequential(
            *(Bottleneck(in_planes + i * growth_rate, growth_rate) for i in range(num_blocks))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        out = F.relu(self.bn(self.dense4(out)))
        return self.linear(torch.flatten(self.avgpool(out), 1))


@register_model("densenet", description="CIFAR DenseNet-121 (kuangliu), 7.0M params")
def densenet121(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    return DenseNet([6, 12, 24, 16], num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model("densenet", description="CIFAR DenseNet-169 (kuangliu), 12.5M params")
def densenet169(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    return DenseNet([6, 12, 32, 32], num_classes=num_classes, in_chans=in_chans, **kwargs)
