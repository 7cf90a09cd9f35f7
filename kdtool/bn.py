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

# BatchNorm subclasses whose forward is the BN's, then their ``drop`` and ``act`` modules:
# timm's fused norm + activation layers (BatchNormAct2d in EfficientNet, MobileNetV3, ...).
_BN_THEN_ACT = {("timm.layers.norm_act", "BatchNormAct2d"),
                ("timm.layers.norm_act", "SyncBatchNormAct")}
_PLAIN_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)


def bn_tail(m: _BatchNorm) -> list[nn.Module] | None:
    """What a BN layer applies after normalising: [] for a plain BN, [drop, act] for a fused
    BN + activation, None for a subclass with some other forward of its own."""
    cls = type(m)
    if cls.forward in _PLAIN_BN_FORWARDS:
        return []
    if (cls.__module__, cls.__qualname__) in _BN_THEN_ACT:
        tail = [getattr(m, a, None) for a in ("drop", "act")]
        return [t for t in tail if isinstance(t, nn.Module) and not isinstance(t, nn.Identity)]
    return None


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
            m.training = True  # the BN alone: a fused BN + activation's dropout stays off
            m.track_running_stats = False
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            m.track_running_stats = track


def _global_forward(m: _BatchNorm, x):
    """BN on the statistics of the batch across every process of the default group."""
    import torch
    import torch.distributed as dist

    dims = [d for d in range(x.ndim) if d != 1]
    xf = x.float()
    count = torch.tensor(xf.numel() / xf.shape[1], device=x.device)
    stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count.view(1)])
    dist.all_reduce(stats)
    c = m.num_features
    mean = stats[:c] / stats[-1]
    var = (stats[c : 2 * c] / stats[-1] - mean * mean).clamp_min(0)  # biased, as BN's
    shape = [1, c] + [1] * (x.ndim - 2)
    y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + m.eps)
    if m.affine:
        y = y * m.weight.view(shape) + m.bias.view(shape)
    y = y.to(x.dtype)
    for module in bn_tail(m) or []:  # a fused BN + activation's activation
        y = module(y)
    return y


@contextmanager
def swapped_forward(modules: Iterable[nn.Module], fn) -> Iterator[None]:
    """Inside the context each module runs ``fn(module, *args)`` as its ``forward``.

    The instance attribute shadows the class's method and is removed on exit, even when
    the forward fails; parameters and buffers are untouched.
    """
    chosen = list(modules)
    try:
        for m in chosen:
            m.forward = fn.__get__(m)
        yield
    finally:
        for m in chosen:
            m.__dict__.pop("forward", None)


def global_batch_stats(layers: Iterable[_BatchNorm]):
    """Make ``layers`` normalise with the statistics of the batch summed over all processes.

    What SyncBatchNorm does, for any device and without converting the model: each
    layer all-reduces its per-channel sum, sum of squares and count (torch.distributed's
    default group, which must be initialised), so N processes with batch B normalise
    like one process with batch N x B. Running buffers are neither read nor written;
    ``forward`` is swapped only inside the context.
    """
    return swapped_forward(layers, _global_forward)
