"""Wide ResNets (Zagoruyko & Komodakis 2016), after xternalz/WideResNet-pytorch.

Pre-activation blocks (BN-ReLU-conv).  Where a block changes width or stride,
the pre-activation is shared by the residual branch and the 1x1 shortcut conv.
Within a block, ``conv1`` is directly followed by ``bn2``; the leading ``bn1``
of each block acts on the block input (not on a conv output), which is inherent
to pre-activation and cannot be folded into a preceding conv.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdtool.models._registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes and stride == 1
        self.conv_shortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # Identity blocks add the raw input; projecting blocks project the pre-activation.
        return out + (x if self.conv_shortcut is None else self.conv_shortcut(pre))


class NetworkBlock(nn.Module):
    def __init__(
        self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ):
        super().__init__()
        blocks = [BasicBlock(in_planes, out_planes, stride, drop_rate)]
        blocks += [BasicBlock(out_planes, out_planes, 1, drop_rate) for _ in range(num_layers - 1)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 10,
        in_chans: int = 3,
        dropRate: float = 0.0,  # xternalz's argument name, kept for familiarity
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, dropRate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, dropRate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, dropRate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        # xternalz's init: He fan-out convs, unit BN, zero linear bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


@register_model("wide_resnet", description="WRN-16-8 (pre-activation), 11.0M params")
def wrn16_8(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    return WideResNet(16, 8, num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model("wide_resnet", description="WRN-28-10 (pre-activation), 36.5M params")
def wrn28_10(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    return WideResNet(28, 10, num_classes=num_classes, in_chans=in_chans, **kwargs)
