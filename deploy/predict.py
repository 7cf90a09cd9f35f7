"""``kdtool predict``: a model's top classes for image files, without a server.

The model file says how to feed it (input size, channels, --resize rule, normalisation,
layout, class names); the pixels are prepared by the code ``kdtool serve``'s /classify
uses, and the model runs on the runners ``kdtool bench`` and ``kdtool export`` use, so a
prediction here is the one the server and the benchmark would give.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdtool.deploy.backends import (
    BACKENDS,
    BackendUnavailable,
    BenchModel,
    backend_problem,
    int8_caveat,
    load_model,
    make_runner,
)
from kdtool.errors import KdtoolError, check_choice

# backend "auto": the first of these that runs here, per kind of model file
AUTO_BACKENDS = {
    "checkpoint": ("torch-cuda", "torch-cpu"),
    "onnx": ("ort-cuda", "ort-cpu"),
    "trt": ("trt",),
}
KIND_NAMES = {"checkpoint": "a kdtool checkpoint", "onnx": "an ONNX file",
              "trt": "a TensorRT engine"}


@dataclass(frozen=True)
class PredictConfig:
    model: Path
    inputs: tuple[Path, ...]
    backend: str = "auto"
    top: int | None = None  # None: up to DEFAULT_TOP
    batch_size: int = 32
    threads: int | None = None


def image_extensions() -> tuple[str, ...]:
    """The names a folder scan takes for images: the dataset loaders' (``IMAGE_EXTS``) and
    every one Pillow registers for a format ``kdtool serve`` decodes (GIF among them), so
    that a folder gives predict the images that naming its files would."""
    from PIL import Image

    from kdtool.deploy.server.images import FORMATS
    from kdtool.imagefiles import IMAGE_EXTS

    Image.init()
    served = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in FORMATS)
    return tuple(dict.fromkeys([*IMAGE_EXTS, *served]))


def list_images(inputs: tuple[Path, ...]) -> list[Path]:
    """Image files given, and the images inside folders given (recursively), each once."""
    from kdtool.imagefiles import image_files

    exts = image_extensions()
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            inside = image_files(path, exts)
            if not inside:
                raise KdtoolError(f"folder '{path}' holds no images",
                                  f"looked for {' '.join(exts)} files (any case)")
            found += inside
        elif path.suffix.lower() in (".zip", ".npz") and path.is_file():
            raise KdtoolError(f"'{path}' is a dataset archive, and predict takes image files "
                              "or folders of them", f"unzip it, or measure the model on it: "
                              f"kdtool eval MODEL --data {path}")
        elif path.is_file():
            found.append(path)  # any name: a file that is no image says so when decoded
        else:
            raise KdtoolError(f"'{path}' does not exist", "pass image files or folders of images")
    return list(dict.fromkeys(found))


READ_HINT = "pass JPEG, PNG, WebP, BMP, GIF, TIFF or PPM/PGM files; replace this one"
LARGE_HINT = "downscale it (the model sees it at its input size)"


def read_hint(why: str) -> str:
    """What to do about an image read_image could not read, given why."""
    return LARGE_HINT if "megapixel limit" in why else READ_HINT


def read_image(path: Path, model: BenchModel) -> np.ndarray | str:
    """One image as the model's input row, prepared as the server prepares it; or, for a
    file that does not decode, why (the run goes on without it)."""
    from kdtool.deploy.server.images import decode, preprocess
    from kdtool.deploy.server.protocol import RequestError

    try:  # the server's own steps: its formats, pixel limit and conversion errors
        data = path.read_bytes()
        return preprocess(decode(data, "it"), model, np.dtype(model.input_dtype), "it")
    except RequestError as e:  # a truncated JPEG, a float TIFF: this image, not the run
        return e.message
    except OSError as e:
        return e.strerror or str(e)


DEFAULT_TOP = 5


def check_top(top: int | None, num_classes: int) -> int:
    """The classes to show: --top capped at the model's classes (said, when it was given)."""
    if top is None:
        return min(DEFAULT_TOP, num_classes)
    if top < 1:
        raise KdtoolError(f"--top {top} is not a number of classes", "e.g. --top 5")
    if top > num_classes:  # said, so that a script's "top" in the JSON is no surprise
        from kdtool import console

        console.info(f"--top {top} is more than the model's {num_classes} classes: "
                     f"showing all {num_classes}")
    return min(top, num_classes)


def start_runner(model: BenchModel, backend: str, threads: int | None):
    """(runner, backend): ``backend``, or for "auto" the first of AUTO_BACKENDS that starts."""
    from kdtool import console

    check_choice(backend, ["auto", *BACKENDS], "backend")
    if backend != "auto":
        kind = BACKENDS[backend][0]
        if kind != model.kind:
            raise KdtoolError(
                f"'{model.path}' is {KIND_NAMES[model.kind]}, and backend {backend} runs "
                f"{KIND_NAMES[kind]}",
                "choose one of: auto, " + ", ".join(
                    b for b, (k, _) in BACKENDS.items() if k == model.kind))
        try:
            return make_runner(model, backend, threads), backend
        except BackendUnavailable as e:
            raise KdtoolError(f"backend {backend} cannot run here: {e}",
                              "use --backend auto (the first backend that runs here)") from None
    candidates = AUTO_BACKENDS[model.kind]
    reasons = []
    for name in candidates:
        problem = backend_problem(name)
        if problem is None:
            try:
                return make_runner(model, name, threads), name
            except BackendUnavailable as e:
                problem = str(e)
                if name != candidates[-1]:
                    console.warn(f"{name} did not start ({problem}); trying the next backend")
        reasons.append(f"{name}: {problem}")
    raise KdtoolError(f"no backend runs '{model.path}' here ({'; '.join(reasons)})",
                      "install what the reason names, or run the file on another machine")


def batch_for(runner, wanted: int) -> int:
    """The batch the runner takes: its static batch, or ``wanted`` within its profile."""
    fixed = runner.inner.fixed_batch
    if fixed is not None:
        return fixed
    lo, hi = runner.inner.batch_range
    return max(lo, wanted if hi is None else min(wanted, hi))


def predict(cfg: PredictConfig) -> dict[str, Any]:
    from kdtool import console
    from kdtool.deploy.server.images import top_k

    if cfg.batch_size < 1:
        raise KdtoolError(f"--batch-size {cfg.batch_size} is not a batch size", "e.g. 32")
    model = load_model(cfg.model)
    k = check_top(cfg.top, model.num_classes)
    images = list_images(cfg.inputs)
    names = model.class_names or [str(i) for i in range(model.num_classes)]  # as serve
    runner, backend = start_runner(model, cfg.backend, cfg.threads)
    results: list[dict[str, Any]] = []
    unreadable: list[tuple[Path, str]] = []
    try:
        batch = batch_for(runner, cfg.batch_size)
        with console.progress_task("predict", len(images), unit="img") as advance:
            for start in range(0, len(images), batch):
                chunk = images[start:start + batch]
                entries = [{"image": str(p)} for p in chunk]
                rows, read = [], []
                for p, entry in zip(chunk, entries, strict=True):
                    x = read_image(p, model)
                    if isinstance(x, str):  # one bad file costs its own answer, not the run's
                        entry["error"] = x
                        unreadable.append((p, x))
                    else:
                        rows.append(x)
                        read.append(entry)
                if rows:
                    logits = runner.infer_whole(np.stack(rows), batch)
                    for entry, row in zip(read, logits, strict=True):
                        entry["predictions"] = top_k(row, k, names)
                results += entries
                advance(len(chunk))
            if len(unreadable) == len(images):
                # Nothing to show: one line, as any user error (and no progress line after).
                path, why = unreadable[0]
                raise KdtoolError(
                    f"cannot read image '{path}': {why}", read_hint(why) if len(images) == 1
                    else f"none of the {len(images)} images could be read; {read_hint(why)}")
        described = runner.describe()
    finally:
        runner.close()
    for path, why in unreadable:  # after the run, so that all of them are one line each
        console.warn(f"cannot read image '{path}': {why}; skipped")
    caveat = int8_caveat(described)
    if caveat:
        console.info(f"note: {caveat}")
    return {
        "model": model.summary(),
        "backend": backend,
        "runtime": described["runtime"],
        "device": described["device"],
        "preprocessing": {
            "input_size": list(model.input_size),
            "channels": model.in_chans,
            "resize": _resize_rule(model),
            "interpolation": model.interpolation,
            "mean": list(model.mean),
            "std": list(model.std),
        },
        "top": k,
        "results": results,
        "unreadable": len(unreadable),
        **({"cpu_caveat": caveat} if caveat else {}),
    }


def _resize_rule(model: BenchModel) -> str:
    from kdtool.imageprep import Fit

    return Fit.of(model).describe().removeprefix("--resize ")


def to_csv(result: dict) -> str:
    """One row per image: image, then label and probability of each of the top classes; when
    an image could not be read, an ``error`` column says why (and its other cells are empty)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    k = result["top"]
    errors = any("error" in r for r in result["results"])
    writer.writerow(["image"] + [f"{c}{i}" for i in range(1, k + 1) for c in ("label", "p")]
                    + (["error"] if errors else []))
    for r in result["results"]:
        cells = [r["image"]]
        for p in r.get("predictions", []):
            cells += [p["label"], f"{p['probability']:.6f}"]
        if errors:
            cells += [""] * (1 + 2 * k - len(cells)) + [r.get("error", "")]
        writer.writerow(cells)
    return buf.getvalue()
