"""``kdtool calibrate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli.app import app
from kdtool.cli.options import (
    DATA_HELP,
    Device,
    Force,
    Json,
    Seed,
    Threads,
    parse_image_size,
)

_SHOWN = 12  # layers listed per group in the table output (--json lists all)


@app.command("calibrate")
def calibrate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="The student: a kdtool checkpoint.")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            "--calib-data",
            help="Real images to compute BN statistics from; labels are not read (an "
            "unlabeled folder of images works), and only the --batches x --batch-size images "
            "drawn are decoded (all of them with --sweep). " + DATA_HELP,
        ),
    ],
    batches: Annotated[
        int,
        typer.Option(
            "--batches", help="Calibration batches (the statistics are their exact average)."
        ),
    ] = 32,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images per calibration batch (the paper's: 16).")
    ] = 16,
    fold: Annotated[
        bool,
        typer.Option(
            "--fold/--no-fold", help="Fold BN into the conv/linear weights after calibrating."
        ),
    ] = True,
    val: Annotated[
        str | None,
        typer.Option("--val", help="Labelled data: report accuracy before and after calibration."),
    ] = None,
    sweep: Annotated[
        str | None,
        typer.Option(
            "--sweep",
            help="Also measure --val accuracy against calibration batches, e.g. "
            "1,2,4,8,16,32,64 (CSV + PNG plot).",
        ),
    ] = None,
    repeats: Annotated[
        int, typer.Option("--repeats", help="With --sweep: seeds per point (seed, seed+1, ...).")
    ] = 1,
    sweep_out: Annotated[
        Path | None,
        typer.Option(
            "--sweep-out",
            help="With --sweep: the CSV to write (the PNG goes beside it).",
            show_default="OUT without .safetensors + .sweep.csv",
        ),
    ] = None,
    image_size: Annotated[
        str | None,
        typer.Option(
            "--image-size",
            help="Not needed: --data and --val images are fitted to the model's input H,W by "
            "the checkpoint's --resize rule. Kept for scripts; another size is refused.",
        ),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance", help="Largest allowed abs logit difference, folded vs unfolded, "
            "per unit of the largest abs logit (when above 1: float32 rounding grows with "
            "the logits).", show_default="1e-4"  # calibrate.fold.DEFAULT_TOLERANCE (test)
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Calibrated checkpoint to write.",
            show_default="CHECKPOINT.cal.safetensors",
        ),
    ] = None,
    force: Force = False,
    seed: Seed = 0,
    device: Device = "auto",
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Recompute a student's BatchNorm statistics from a few real images, then fold BN away.

    A noise-distilled student carries statistics of noise in its BN layers. Calibration
    resets them and recomputes them exactly from --batches x --batch-size real images
    (no labels, weights untouched); folding then merges each BN into the conv/linear next
    to it, checking that the logits stay within --tolerance.

    Example: [bold]kdtool calibrate student.safetensors --data digits --batches 32
    --batch-size 16 --val digits:test --out student.cal.safetensors[/bold]
    """
    from kdtool import console
    from kdtool.calibrate.pipeline import CalibrateConfig, calibrate
    from kdtool.calibrate.sweep import parse_points
    from kdtool.device import cpu_threads

    cfg = CalibrateConfig(
        checkpoint=str(checkpoint),
        data=data,
        out=str(out) if out else None,
        batches=batches,
        batch_size=batch_size,
        fold=fold,
        val=val,
        sweep=parse_points(sweep) if sweep is not None else None,
        repeats=repeats,
        sweep_out=str(sweep_out) if sweep_out else None,
        image_size=parse_image_size(image_size),
        tolerance=tolerance,
        seed=seed,
        device=device,
        force=force,
    )
    with cpu_threads(threads):
        result = calibrate(cfg)

    console.emit(result, as_json, lambda r: _render(r, val))


def _render(r: dict, val: str | None) -> None:
    from kdtool import console

    rows = [
        ["output", r["out"]],
        [
            "calibration",
            f"{r['images']} images of '{r['data']}' ({r['batches']} x "
            f"{r['batch_size']}, seed {r['seed']})",
        ],
        ["BatchNorm layers", r["bn_layers"]],
    ]
    if r["folded"]:
        f = r["fold"]
        rows += [
            ["folded", f["summary"]],
            [
                "fold check",
                f"max abs logit difference {f['max_abs_diff']:.2e} (<= {f['tolerance']:g} "
                f"x {f['logit_scale']:.3g}, the largest logit)",
            ],
        ]
    else:
        rows.append(["folded", "no (--no-fold): BN layers kept with the new statistics"])
    rows.append(["time", ", ".join(f"{k} {v:.2f} s" for k, v in r["seconds"].items())])
    console.print_kv("kdtool calibrate", rows)
    if r["folded"]:
        _print_layers(r["fold"]["layers"])
    if r["accuracy"]:
        a = r["accuracy"]
        console.out.print(
            console.table(
                f"top-1 on '{val}'",
                ["model", "BN statistics", "top-1 %"],
                [
                    ["input", "its own running statistics", f"{a['input_running']:.2f}"],
                    ["input", f"current (batch {r['current_batch']})",
                     f"{a['input_current']:.2f}"],
                    ["calibrated", "running (any batch size, 1 too)", f"{a['calibrated']:.2f}"],
                ],
            )
        )
    if "sweep" in r:
        console.out.print(f"sweep: {r['sweep']['csv']}, {r['sweep']['png']}", markup=False)


def _print_layers(layers: list[dict]) -> None:
    from kdtool import console

    folded = [e for e in layers if e["action"] != "affine"]
    kept = [e for e in layers if e["action"] == "affine"]
    rows = [
        [e["bn"], ("into " if e["action"] == "into_prev" else "into next ") + e["target"]]
        for e in folded[:_SHOWN]
    ]
    rows += [[e["bn"], f"kept as scale-and-shift: {e['reason']}"] for e in kept[:_SHOWN]]
    more = max(0, len(folded) - _SHOWN) + max(0, len(kept) - _SHOWN)
    title = "BatchNorm folding" + (
        f" (first {_SHOWN} of each kind; {more} more with --json)" if more else ""
    )
    console.out.print(console.table(title, ["BatchNorm", "result"], rows))
