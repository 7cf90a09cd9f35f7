"""Accuracy of a classifier on a dataset, with BN on running or on current batch statistics."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.nn as nn

from kdtool import console
from kdtool.bn import BN_MODES, batch_stats, bn_layers
from kdtool.data import ImageData, ImageStream, chunk_rows
from kdtool.device import autocast_for
from kdtool.errors import KdtoolError, check_choice
from kdtool.loader import DeviceLoader, epoch_generator, epoch_order

TTA_MODES = ("none", "flip")  # test-time augmentation: none, or horizontal mirror images


@torch.no_grad()
def predict(
    model: nn.Module,
    data: ImageData | ImageStream,
    mean: list[float],
    std: list[float],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    bn: str = "running",
    seed: int = 0,
    channels_last: bool = False,
    progress: bool = False,
    tta: str = "none",
    shuffle: bool | None = None,
    lasting: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and labels of ``data``, in the dataset's order.

    With ``bn="current"`` every BN layer normalises with the statistics of its
    batch (the paper's evaluation of a noise student); batches are then drawn
    in an order shuffled with ``seed``, because image folders are sorted by
    class and a batch of one class has statistics unlike any real batch.
    ``tta="flip"``: the mean of the logits of each batch and of its mirror image (the
    mirrored batch is a batch of its own for ``bn="current"``).
    ``shuffle``: draw batches in that seeded order whatever ``bn`` says (a model that
    couples a batch's images in other ways than BN; default: as ``bn="current"`` does).
    ``progress``: a progress bar over the batches, on stderr. It goes when done, as a step of
    a larger command should, unless ``lasting`` (``kdtool eval``, whose work it is: the bar
    stays, and with ``KDTOOL_PROGRESS=lines`` a log gets its lines and a last one).
    An ImageStream is decoded a chunk of whole batches at a time: the same batches, the
    same logits as the dataset in memory.
    """
    check_choice(bn, BN_MODES, "BN mode")
    check_choice(tta, TTA_MODES, "--tta mode")
    if bn == "current" and not bn_layers(model):
        raise KdtoolError("--bn current needs BatchNorm layers and the model has none",
                          "use --bn running")
    if bn == "current" and len(data) < 2:  # one image has no batch statistics
        raise KdtoolError(f"--bn current needs 2 or more images, and '{data.source}' has "
                          f"{len(data)}", "evaluate more images, or use --bn running")
    if bn == "current" and batch_size < 2:
        raise KdtoolError(f"--bn current normalises with each batch's statistics, and a batch "
                          f"of {batch_size} image has none", "use --batch-size 2 or more")
    device = torch.device(device)
    model.eval()
    shuffle = bn == "current" if shuffle is None else shuffle
    order = epoch_order(len(data), shuffle, epoch_generator(seed, 0, device), device).cpu()
    batches = -(-len(data) // batch_size)
    logits, indices = [], []
    ctx = batch_stats(model) if bn == "current" else nullcontext()
    bar = (console.progress_task("evaluate", batches, unit="batch", transient=not lasting)
           if progress else nullcontext(lambda n=1, info=None: None))

    def in_order() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised batches on ``device``, with their dataset positions (on the CPU)."""
        for chunk, pos in data.chunks(order, chunk_rows(data, batch_size)):
            loader = DeviceLoader(chunk, batch_size, device, mean, std,
                                  channels_last=channels_last)
            del chunk  # held by the loader alone, and freed with it before the next decode
            for x, _, idx in loader.epoch(0, with_index=True):
                yield x, pos[idx.cpu()]
            del loader

    def run(x: torch.Tensor, idx: torch.Tensor, batches: int) -> None:
        out = model(x).float()
        if tta == "flip":
            out = (out + model(x.flip(-1)).float()) / 2
        logits.append(out.cpu())
        indices.append(idx)
        advance(batches)

    with bar as advance, ctx, autocast_for(device):
        held, last = None, batches - 1  # each batch waits: a last one of one image joins it
        for i, (x, idx) in enumerate(in_order()):
            if held is not None and bn == "current" and i == last and len(idx) == 1:
                # one image has no batch statistics (BN would divide by a zero variance):
                # 257 images at batch 256 run as one batch of 257
                held = (torch.cat([held[0], x]), torch.cat([held[1], idx]), 2)
                continue
            if held is not None:
                run(*held)
            held = (x, idx, 1)
        run(*held)
    ordered = torch.empty(len(data), logits[0].shape[1])
    ordered[torch.cat(indices)] = torch.cat(logits)
    return ordered, data.y.clone()


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy of ``correct`` of ``n``, in %.

    What a top-1 on this many images can tell apart: on 360 images an 84% is 80-87%, so
    two models 1 point apart on it are not known to differ. Wilson, not the normal
    approximation, stays inside 0-100% and is right near 0% and 100%."""
    if n <= 0:
        raise ValueError("an interval needs at least one image")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def percent_equal(a: torch.Tensor, b: torch.Tensor) -> float:
    """How often ``a`` and ``b`` agree, in %, counted exactly: 31 of 360 is 8.61111111111111,
    where a float32 mean gives 8.611111342906952 to a JSON file."""
    return 100.0 * int((a == b).sum()) / a.numel()


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Top-1 (and top-5 where there are > 5 classes) accuracy, overall and per class, in %,
    with the top-1's 95% interval and the image count of each class."""
    pred = logits.argmax(1)
    correct = pred == labels
    n, k = len(labels), int(correct.sum())
    report = {"images": n, "top1": 100.0 * k / n, "top1_ci95": list(wilson_interval(k, n))}
    if logits.shape[1] > 5:
        top5 = logits.topk(5, dim=1).indices.eq(labels[:, None]).any(1)
        report["top5"] = 100.0 * int(top5.sum()) / n
    per_class, per_class_images = {}, {}
    for c, name in enumerate(class_names):
        mask = labels == c
        if mask.any():
            per_class[name] = 100.0 * int(correct[mask].sum()) / int(mask.sum())
            per_class_images[name] = int(mask.sum())
    report["per_class"] = per_class
    report["per_class_images"] = per_class_images
    return report


def evaluate(model, data, mean, std, **kwargs) -> dict:
    data.require_labels("dataset")
    logits, labels = predict(model, data, mean, std, **kwargs)
    return accuracy_report(logits, labels, data.class_names)
