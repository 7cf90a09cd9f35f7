"""BatchNorm helpers: which statistics a model normalises with.

Noise distillation works because the teacher's BN layers normalise with the
*current* batch statistics; evaluation of a noise student likewise has a
``current`` mode.  Both go through ``batch_stats`` so that no running buffer is
ever updated as a side effect.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

BN_MODES = ("running", "current")


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


@contextmanager
def batch_stats(model: nn.Module, layers: Iterable[_BatchNorm] | None = None) -> Iterator[None]:
    """Make ``layers`` (default: every BN layer) normalise with the current batch statistics.

    Each layer is put in train mode with ``track_running_stats`` off, so it
    neither reads nor writes its running buffers; every other module keeps its
    mode (dropout stays off in eval).  Modes are restored on exit.
    """
    chosen = list(layers) if layers is not None else [m for _, m in bn_layers(model)]
    saved = [(m, m.training, m.track_running_stats) for m in chosen]
    try:
        for m in chosen:
            m.train()
            m.track_running_stats = False
        yield
    finally:
        for m, training, track in saved:
            m.train(training)
            m.track_running_stats = track
