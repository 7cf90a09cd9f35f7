"""Top-1 accuracy of a benchmark runner on labelled data, normalised as ``kdtool eval`` does."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kdtool import console
from kdtool.data import Draw, ImageData, ImageStream, check_fits, chunk_rows, open_for_model
from kdtool.deploy.backends import BenchModel, int8_caveat
from kdtool.errors import KdtoolError
from kdtool.loader import DeviceLoader


def load_eval_data(spec: str, model: BenchModel, limit: int | None,
                   seed: int) -> ImageData | ImageStream:
    """``spec`` at the model's input size and channels; ``limit`` keeps a seeded random subset
    (image folders are sorted by class, so the first N images would be one class), and a
    folder or zip decodes just those images; one too large to hold is an ImageStream."""
    data = open_for_model(spec, model, None if limit is None else Draw(limit, seed))
    data.require_labels("accuracy data")
    check_fits(
        data,
        num_classes=model.num_classes,
        in_chans=model.in_chans,
        what=model.label,
        class_names=model.class_names,
    )
    return data


def runner_logits(runner, model: BenchModel, data: ImageData | ImageStream, batch: int,
                  advance=None, flip: bool = False) -> np.ndarray:
    """Float32 logits of ``runner`` on ``data``, in the dataset's order, in batches of
    ``batch`` (the last one padded when the runner only takes whole batches). ``flip``: the
    mean of each image's logits and its mirror image's (``kdtool eval --tta flip``)."""
    out, done = [], 0
    for chunk, _ in data.chunks(torch.arange(len(data)), chunk_rows(data, batch)):
        # The same loader as kdtool eval: identical normalisation arithmetic, so the torch
        # row matches kdtool eval exactly.
        for x, _ in DeviceLoader(chunk, batch, "cpu", model.mean, model.std):
            out.append(_logits(runner, model, x, batch, flip))
            done += len(x)
            if advance is not None:
                advance(0, info=f"{model.label} {runner.backend} accuracy {done}/{len(data)}")
        del chunk  # freed before the next chunk decodes
    return np.concatenate(out)


def _logits(runner, model: BenchModel, x: torch.Tensor, batch: int, flip: bool) -> np.ndarray:
    logits = _infer(runner, model, x.numpy(), batch)
    if flip:
        logits = (logits + _infer(runner, model, x.flip(-1).numpy(), batch)) / 2
    return logits


def _infer(runner, model: BenchModel, xb: np.ndarray, batch: int) -> np.ndarray:
    n = len(xb)
    logits = np.asarray(runner.infer_whole(model.prepare(xb), batch), np.float32)
    if logits.shape != (n, model.num_classes):
        # The file disagrees with its own metadata: an edited ONNX, or an engine scored with
        # the metadata of an ONNX beside it that was re-exported since.
        raise KdtoolError(
            f"'{model.path}' returned logits of shape {list(logits.shape)} for {n} images, "
            f"but its kdtool metadata says {model.num_classes} classes",
            "export the model again (kdtool export), and keep a TensorRT engine beside the "
            "metadata of the ONNX it was built from",
        )
    return logits


def runner_accuracy(
    runner, model: BenchModel, data: ImageData | ImageStream, batch: int, advance=None
) -> dict[str, Any]:
    """Top-1 of ``runner`` on ``data`` in batches of ``batch``."""
    logits = runner_logits(runner, model, data, batch, advance)
    correct = int((logits.argmax(1) == data.y.numpy()).sum())
    return {
        "top1": 100.0 * correct / len(data),
        "correct": correct,
        "images": len(data),
        "batch": batch,
    }


def evaluate_file(path, spec: str, *, device: str = "auto", batch_size: int = 256,
                  tta: str = "none", threads: int | None = None, limit: int | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """``kdtool eval`` of an ONNX file or TensorRT engine: the deployed model's own accuracy
    report (top-1 with its interval, top-5, per class) on ``spec``, run by the runners
    ``kdtool bench`` uses. ``device``: auto, cpu or cuda[:N] (the provider for ONNX);
    ``threads``: ONNX Runtime's intra-op threads (None or 0: one per core); ``limit``:
    a ``seed``ed random ``limit`` of the images (load_eval_data)."""
    from kdtool.deploy.backends import load_model
    from kdtool.deploy.predict import batch_for, start_runner
    from kdtool.evaluate import accuracy_report

    model = load_model(path)
    backend = "trt" if model.kind == "trt" else "auto"
    if device != "auto":
        from kdtool.device import resolve_device

        dev = resolve_device(device)  # a bad name, or no GPU: the usual one-line error
        if dev.index not in (None, 0):
            raise KdtoolError(f"--device {device}: kdtool runs ONNX Runtime and TensorRT on the "
                              "first visible GPU", f"set CUDA_VISIBLE_DEVICES={dev.index}")
        if model.kind == "onnx":
            backend = "ort-cpu" if dev.type == "cpu" else "ort-cuda"
        elif dev.type == "cpu":
            raise KdtoolError(f"'{path}' is a TensorRT engine, which runs on a GPU only",
                              "drop --device cpu, or evaluate the .onnx it was built from")
    data = load_eval_data(spec, model, limit, seed)
    runner, used = start_runner(model, backend, threads)
    try:
        batch = batch_for(runner, batch_size)
        # The bar of kdtool eval on a checkpoint: the command's own work, so it stays.
        with console.progress_task("evaluate", -(-len(data) // batch), unit="batch") as step:
            logits = runner_logits(runner, model, data, batch, lambda n, info=None: step(1),
                                   flip=tta == "flip")
        described = runner.describe()
    finally:
        runner.close()
    report = accuracy_report(torch.from_numpy(logits), data.y, data.class_names)
    result = {"backend": used, "runtime": described["runtime"], "batch_size": batch, **report}
    caveat = int8_caveat(described)
    if caveat:
        result["cpu_caveat"] = caveat
        console.info(f"note: {caveat}")
    return result

