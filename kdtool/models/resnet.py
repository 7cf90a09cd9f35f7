"""CIFAR ResNets.

``resnet18`` / ``resnet34`` follow kuangliu/pytorch-cifar (64-512 channels, four
stages); ``resnet8`` / ``resnet20`` are He et al. 2016's CIFAR nets (16-64
channels, three stages) with option-B projection shortcuts.  Both families share
one block and one trunk: they differ only in widths and blocks per stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdtool.models._registry import register_model


def make_norm(kind: str, channels: int) -> nn.Module:
    """``batch``: BatchNorm2d; ``group``: GroupNorm with 8 channels per group (a teacher
    without batch statistics, for ``kdtool distill --teacher-norm-align``)."""
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 8), channels)
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "batch"):
        super().__init__()
        # Each conv is directly followed by its BN (in modules and forward), so
        # BN folding can pair them by position.
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            # Option B: a learned 1x1 projection wherever the shape changes.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False),
                make_norm(norm, planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR trunk: 3x3 stem (no max-pool), one stage per width, global pool, linear."""

    def __init__(
        self,
        num_blocks: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_chans: int = 3,
        block: type[nn.Module] = BasicBlock,
        norm: str = "batch",
    ):
        super().__init__()
        self.in_planes = widths[0]
        self.norm = norm
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, widths[0])
        # layer1, layer2, ...: the first stage keeps resolution, later ones halve it.
        for i, (width, n) in enumerate(zip(widths, num_blocks, strict=True)):
            stride = 1 if i == 0 else 2
            self.add_module(f"layer{i + 1}", self._make_layer(block, width, n, stride))
        self.num_stages = len(widths)
        # Adaptive pooling (kuangliu uses a fixed 4x4 pool) lets any input >= 8x8 work.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s, norm=self.norm))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.linear(torch.flatten(self.avgpool(out), 1))


_HE_WIDTHS = (16, 32, 64)


@register_model("resnet", description="CIFAR ResNet-18 (kuangliu), 11.2M params")
def resnet18(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    return ResNet([2, 2, 2, 2], num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model("resnet", description="CIFAR ResNet-34 (kuangliu), 21.3M params")
def resnet34(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    return ResNet([3, 4, 6, 3], num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model("resnet", description="CIFAR ResNet-20 (He et al., option B), 0.27M params")
def resnet20(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    return ResNet([3, 3, 3], _HE_WIDTHS, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model("resnet", description="CIFAR ResNet-8 (He et al., option B), 78K params")
def resnet8(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    return ResNet([1, 1, 1], _HE_WIDTHS, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model("resnet", description="CIFAR ResNet-8 with GroupNorm (no BN), 78K params")
def resnet8_gn(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    return ResNet([1, 1, 1], _HE_WIDTHS, num_classes=num_classes, in_chans=in_chans,
                  norm="group", **kwargs)
