"""A tiny CNN (1.6K params) so tests can build, train and export a model in milliseconds."""

from __future__ import annotations

import torch
import torch.nn as nn

from kdtool.models._registry import register_model


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        # One ReLU module per use, so eager-mode conv-bn-relu fusion can name each.
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("test", description="tiny 2-conv CNN for tests", tags=("test",))
def tiny_cnn(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    return TinyCNN(num_classes=num_classes, in_chans=in_chans, **kwargs)
