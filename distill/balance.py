"""Class-balanced noise: the teacher's predicted classes count evenly.

A BN teacher fed Gaussian noise predicts a few classes far more often than the
others (NormShift-KD: "Breaking BatchNorm Barriers for Noise-driven Data Free
Knowledge Distillation", under review 2026), so the student hears little about the
rest.  Two remedies (``--balance``):

- ``reject``: ``BalancedNoise`` draws ``oversample`` x n candidates, asks the
  teacher (on the candidates' own batch statistics) which class each one looks
  like, and keeps at most ceil(n / classes) per class, filling any shortfall
  from the rejected ones a class at a time (each over-supplied class gives its
  next candidate in turn, so the extras spread evenly).  Costs one extra
  teacher forward.
- ``weight``: importance weights (``class_weights``) in the loss, so every
  class the teacher predicts in a batch carries the same total weight.  Costs
  nothing: the batch is the one the teacher already saw.
"""

from __future__ import annotations

import math

import torch

from kdtool.distill.noise import NoiseSource
from kdtool.distill.pool import PooledNoise
from kdtool.distill.teacher import FrozenTeacher
from kdtool.errors import KdtoolError

BALANCE_MODES = ("off", "reject", "weight")


def class_weights(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-sample weights, mean 1, that give every predicted class the same total weight.

    A sample of a class predicted ``k`` times among ``n`` samples and ``c`` present
    classes weighs ``n / (c k)``.  No host synchronisation (CUDA-graph friendly).
    """
    counts = torch.zeros(num_classes, device=pred.device, dtype=torch.float32)
    counts.scatter_add_(0, pred, torch.ones_like(pred, dtype=torch.float32))
    present = (counts > 0).sum()
    return len(pred) / (present * counts[pred])


def balanced_choice(classes: torch.Tensor, n: int, num_classes: int,
                    gen: torch.Generator) -> torch.Tensor:
    """Indices of ``n`` of the candidates, at most ceil(n / num_classes) per class first."""
    m = len(classes)
    key = torch.rand(m, generator=gen, device=classes.device)
    # Rank of each candidate within its class, in random order: sort by (class, key).
    order = torch.argsort(classes.to(torch.float64) + key.to(torch.float64))
    sorted_cls = classes[order]
    first = torch.searchsorted(sorted_cls, torch.arange(num_classes, device=classes.device))
    rank = torch.empty(m, dtype=torch.long, device=classes.device)
    rank[order] = torch.arange(m, device=classes.device) - first[sorted_cls]
    quota = math.ceil(n / num_classes)
    # Within quota first (random order), then the rest by how far over quota they are.
    priority = torch.where(rank < quota, key, 1.0 + rank.to(key.dtype) + key)
    return torch.argsort(priority)[:n]


class BalancedNoise:
    """A NoiseSource whose batches the teacher sees as class-balanced."""

    def __init__(self, source: NoiseSource | PooledNoise, teacher: FrozenTeacher, num_classes: int,
                 oversample: float = 2.0):
        if oversample < 1:
            raise KdtoolError(f"class balancing needs oversample >= 1, got {oversample}")
        self.source, self.teacher = source, teacher
        self.num_classes, self.oversample = num_classes, oversample
        self.kind = source.kind
        self.device = source.device

    def start_epoch(self, gen: torch.Generator) -> None:
        self.source.start_epoch(gen)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        candidates = self.source.sample(math.ceil(n * self.oversample), gen)
        classes = self.teacher(candidates).argmax(1)
        return candidates[balanced_choice(classes, n, self.num_classes, gen)]

    def describe(self) -> dict:
        return {**self.source.describe(), "balanced": True, "oversample": self.oversample}
