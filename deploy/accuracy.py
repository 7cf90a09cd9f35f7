"""Top-1 accuracy of a benchmark runner on labelled data, normalised as ``kdtool eval`` does."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdtool.data import ImageData, check_fits, load_for_model
from kdtool.deploy.backends import BenchModel
from kdtool.errors import KdtoolError
from kdtool.loader import DeviceLoader


def load_eval_data(spec: str, model: BenchModel, limit: int | None, seed: int) -> ImageData:
    """``spec`` at the model's input size and channels; ``limit`` keeps a seeded random subset
    (image folders are sorted by class, so the first N images would be one class)."""
    data = load_for_model(spec, model)
    if not data.labeled:
        raise KdtoolError(
            f"dataset '{spec}' has no labels, so accuracy cannot be measured",
            "pass labelled data: a folder of class subfolders, a zip of one, or an npz with y",
        )
    check_fits(
        data,
        num_classes=model.num_classes,
        in_chans=model.in_chans,
        what=model.label,
    )
    if limit is not None and limit < len(data):
        gen = torch.Generator().manual_seed(seed)
        data = data.subset(torch.randperm(len(data), generator=gen)[:limit].sort().values)
    return data


def runner_accuracy(
    runner, model: BenchModel, data: ImageData, batch: int, advance=None
) -> dict[str, Any]:
    """Top-1 of ``runner`` on ``data`` in batches of ``batch`` (the last one padded when the
    runner only takes whole batches)."""
    # The same loader as kdtool eval: identical normalisation arithmetic, so the torch row
    # matches kdtool eval exactly.
    loader = DeviceLoader(data, batch, "cpu", model.mean, model.std)
    correct = done = 0
    for x, y in loader:
        n = len(y)
        xb = x.numpy()
        if n < batch and runner.batch_problem(n):
            xb = np.concatenate([xb, np.repeat(xb[-1:], batch - n, axis=0)])
        logits = np.asarray(runner.infer(model.prepare(xb)))[:n]
        if logits.shape != (n, model.num_classes):
            raise RuntimeError(
                f"the model returned shape {logits.shape} for {n} images; "
                f"expected ({n}, {model.num_classes})"
            )
        correct += int((logits.argmax(1) == y.numpy()).sum())
        done += n
        if advance is not None:
            advance(0, info=f"{model.label} {runner.backend} accuracy {done}/{len(data)}")
    return {
        "top1": 100.0 * correct / len(data),
        "correct": correct,
        "images": len(data),
        "batch": batch,
    }
