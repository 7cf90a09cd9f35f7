"""Small plain CNNs (conv-BN-ReLU stacks) for tests and CPU-scale experiments.

``tiny_cnn`` (1.6K params) builds, trains and exports in milliseconds;
``cnn3`` is a 3-conv network, the kind of small BN teacher the method's CPU
figures on digits use (the project's reference figures: a 3-conv teacher at 99.5%
distilled into an 8-channel student).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from kdtool.models._registry import register_model


class PlainCNN(nn.Module):
    """conv3x3-BN-ReLU per width (stride 1 first, then 2), global average pool, linear."""

    def __init__(self, widths: Sequence[int], num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        prev = in_chans
        for i, w in enumerate(widths, start=1):
            self.add_module(f"conv{i}", nn.Conv2d(prev, w, 3, stride=1 if i == 1 else 2,
                                                  padding=1, bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(w))
            # One ReLU module per use, so eager-mode conv-bn-relu fusion can name each.
            self.add_module(f"relu{i}", nn.ReLU())
            prev = w
        self.depth = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


@register_model("test", description="tiny 2-conv CNN (8, 16 channels) for tests", tags=("test",))
def tiny_cnn(num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    return PlainCNN((8, 16), num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model("test", description="3-conv CNN (32, 64, 128 channels), a small BN teacher",
                tags=("test",))
def cnn3(num_classes: int = 10, in_chans: int = 3, width: int = 32, **kwargs) -> nn.Module:
    return PlainCNN((width, 2 * width, 4 * width), num_classes=num_classes, in_chans=in_chans,
                    **kwargs)
