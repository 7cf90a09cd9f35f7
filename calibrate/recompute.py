"""Recompute BatchNorm running statistics from a few real batches (no labels).

Every BN layer's running buffers are reset and rebuilt as the exact cumulative
average of the per-batch statistics over ``batches`` batches (momentum None,
as ``torch.optim.swa_utils.update_bn``), with each BN normalising by its batch
during the pass, as in training.  Only the BN buffers change: weights stay
untouched and every other module runs in eval mode (no dropout).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn

from kdtool import console
from kdtool.bn import bn_layers
from kdtool.data import Draw, ImageData
from kdtool.errors import KdtoolError
from kdtool.loader import DeviceLoader


@dataclass
class Calibration:
    """What the statistics were computed from (recorded in the checkpoint metadata)."""

    source: str
    images: int
    batches: int
    batch_size: int
    seed: int | None  # None: the images came drawn (load_data's draw)
    layers: int
    seconds: float = 0.0


def check_counts(batches: int, batch_size: int) -> None:
    if batches < 1:
        raise KdtoolError(f"--batches must be >= 1, got {batches}")
    if batch_size < 2:
        raise KdtoolError(
            f"--batch-size must be >= 2, got {batch_size}",
            "BatchNorm statistics need at least 2 images per batch; use 16",
        )


def check_enough(n_available: int, batches: int, batch_size: int,
                 source: str = "the data") -> None:
    need = batches * batch_size
    if n_available < need:
        raise KdtoolError(
            f"{source} has {n_available} images but --batches {batches} x --batch-size "
            f"{batch_size} needs {need}",
            f"lower --batches to {n_available // batch_size} or add images"
            if n_available >= batch_size else
            f"lower --batch-size to {n_available} (or less) or add images"
            if n_available >= 2 else "add images: BatchNorm statistics need at least 2",
        )


def sample_indices(
    n_available: int, batches: int, batch_size: int, seed: int, source: str = "the data"
) -> torch.Tensor:
    """``batches * batch_size`` distinct image indices drawn with ``seed``.

    The order is one seeded permutation, so fewer batches with the same seed use
    a prefix of the same images (the sweep's points are nested). They are the images
    ``load_data(..., draw=Draw(batches * batch_size, seed))`` decodes, in its order.
    """
    check_counts(batches, batch_size)
    check_enough(n_available, batches, batch_size, source)
    return Draw(batches * batch_size, seed).indices(n_available)


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module,
    data: ImageData,
    mean: list[float],
    std: list[float],
    batches: int = 32,
    batch_size: int = 16,
    seed: int | None = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Calibration:
    """Reset and recompute every BN layer's running statistics of ``model`` (in place).

    Images are ``sample_indices(len(data), batches, batch_size, seed)``; with ``seed``
    None, ``data`` is that draw already (``load_data(..., draw=...)``) and its first
    ``batches * batch_size`` images are taken in order. ``data.y`` is never read.
    ``model`` must already be on ``device``; it is left in eval mode.
    """
    layers = [m for _, m in bn_layers(model)]
    if not layers:
        raise KdtoolError("the model has no BatchNorm layers: nothing to calibrate")
    t0 = time.perf_counter()
    source = f"'{data.source}'"
    if seed is None:
        check_counts(batches, batch_size)
        check_enough(len(data), batches, batch_size, source)
        index = torch.arange(batches * batch_size)
    else:
        index = sample_indices(len(data), batches, batch_size, seed, source)
    images = ImageData(
        data.x[index].contiguous(), torch.full((len(index),), -1), [], data.source
    )  # labels dropped: calibration never needs them
    loader = DeviceLoader(images, batch_size, device, mean, std, drop_last=True)
    momenta = [m.momentum for m in layers]
    model.eval()
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: batch k enters with weight 1/k
            m.train()
        bar = (
            console.progress_task("calibrate BN", batches, unit="batch", transient=True)
            if progress
            else nullcontext(lambda n=1, info=None: None)
        )
        with bar as advance:
            for x, _ in loader:
                model(x)
                advance(1)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    unused = [n for n, m in bn_layers(model) if int(m.num_batches_tracked) == 0]
    if unused:
        console.warn(
            f"{len(unused)} BatchNorm layer(s) saw no data in the forward pass (e.g. "
            f"'{unused[0]}'): they keep mean 0, variance 1"
        )
    return Calibration(
        data.source, len(index), batches, batch_size, seed, len(layers), time.perf_counter() - t0
    )
