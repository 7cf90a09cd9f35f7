"""``kdtool predict``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli.app import app
from kdtool.cli.options import Force, Json, Threads


@app.command("predict")
def predict_cmd(
    model: Annotated[Path, typer.Argument(
        help="A kdtool checkpoint (.safetensors), an .onnx file with kdtool metadata or a "
        "TensorRT engine with its sidecar.", show_default=False)],
    images: Annotated[list[str], typer.Argument(
        help="Image files, and folders searched for images (with their subfolders).",
        show_default=False)],
    top: Annotated[int | None, typer.Option(
        "--top", help="Classes to give per image, most likely first (at most the model's).",
        show_default="5")] = None,
    backend: Annotated[str, typer.Option(
        "--backend", help="torch-cpu or torch-cuda (checkpoints), ort-cpu, ort-cuda or ort-trt "
        "(ONNX), trt (engines). auto: the GPU one when it runs here, else the CPU one.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Images per call (a static batch or engine profile rules).")] = 32,
    threads: Threads = None,
    csv_out: Annotated[Path | None, typer.Option(
        "--csv", help="Write the predictions here (image, label1, p1, label2, p2, ...; and "
        "error, when an image cannot be read) instead of printing a table.")] = None,
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Classify image files with a model: its top classes and their probabilities.

    Images are fitted and normalised as the model file records (input size, channels,
    --resize rule, mean and std), exactly as 'kdtool serve' prepares them, and the model
    runs on the runners 'kdtool bench' measures. A student straight from 'kdtool distill'
    still has noise statistics in its BatchNorm layers: calibrate it first. An image that
    cannot be read is reported and skipped; the command then exits 1 after the others.

    Example: [bold]kdtool predict student.onnx photos/ cat.jpg --top 3[/bold]
    """
    from kdtool import console
    from kdtool.deploy.predict import PredictConfig, predict, to_csv
    from kdtool.errors import KdtoolError
    from kdtool.imagefiles import IMAGE_EXTS
    from kdtool.io import REPORT, atomic_write_text, check_output

    if "" in images:  # Path("") is the working folder: every image under it, unasked
        raise KdtoolError("an image was given as an empty string",
                          "check the shell variable that names it (unset, or quoted empty)")
    images = [Path(p) for p in images]
    if model.suffix.lower() in IMAGE_EXTS:
        raise KdtoolError(f"'{model}' is an image, and predict takes the model first",
                          f"kdtool predict MODEL {model} ...")
    if csv_out is not None:
        if csv_out.is_dir():  # before check_output, whose hint names --out
            raise KdtoolError(f"--csv '{csv_out}' is a folder; it takes the file to write",
                              f"e.g. --csv {csv_out / 'predictions.csv'}")
        check_output(csv_out, force, "CSV", (".csv",), REPORT)
    result = predict(PredictConfig(model=model, inputs=tuple(images), backend=backend, top=top,
                                   batch_size=batch_size, threads=threads))
    if csv_out is not None:
        atomic_write_text(csv_out, to_csv(result))
        result["csv"] = str(csv_out)
    failed = None
    if result["unreadable"]:
        failed = KdtoolError(f"{result['unreadable']} of {len(result['results'])} images "
                             "could not be read", ("their entries say why" if as_json else
                                                   "the warnings above say why") +
                             "; the others were predicted")
        # --json: the one object holds the predictions made and, as any failure's does,
        # "error" and "hint" (the exit status is 1)
        result.update(error=failed.message, hint=failed.hint)
    console.emit(result, as_json, _render)
    if failed is not None:
        raise failed


def _render(result: dict) -> None:
    from kdtool import console

    n = len(result["results"]) - result["unreadable"]
    pre = result["preprocessing"]
    where = (f"{result['model']['path']} on {result['backend']} ({result['runtime']}); images "
             f"fitted to {'x'.join(map(str, pre['input_size']))} by {pre['resize']}")
    if "csv" in result:
        console.out.print(f"wrote {n} predictions to {result['csv']}: {where}", markup=False)
        return
    rows = []
    for r in result["results"]:
        if "error" in r:
            rows.append([r["image"], "-", "-", f"unreadable: {r['error']}"])
            continue
        best, *rest = r["predictions"]
        rows.append([r["image"], best["label"], f"{100 * best['probability']:.1f}%",
                     ", ".join(f"{p['label']} {100 * p['probability']:.1f}%" for p in rest)])
    console.out.print(console.table("predictions", ["image", "class", "probability", "next"],
                                    rows))
    console.out.print(where, style="dim", soft_wrap=True)
