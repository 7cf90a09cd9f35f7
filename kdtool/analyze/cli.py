"""``kdtool analyze ...``: the paper's analyses, each writing a PNG and a CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtool.analyze import write_csv
from kdtool.cli.app import app
from kdtool.cli.options import DATA_HELP, Device, Force, Json, Seed, Threads

analyze_app = typer.Typer(
    help="The paper's analyses, and learning curves of runs; each writes a PNG and a CSV.\n\n"
    "Example: [bold]kdtool analyze toy --out figures/toy[/bold]",
    no_args_is_help=True,
)
app.add_typer(analyze_app, name="analyze")

OutStem = Annotated[Path, typer.Option(
    "--out", help="Output stem: writes STEM.png and STEM.csv.")]


def _beside(checkpoint: Path, analysis: str) -> Path:
    """The default stem of an analysis of one checkpoint: NAME_ANALYSIS beside it, so
    analyses of two models do not meet at one fixed name."""
    name = checkpoint.name.removesuffix(".safetensors").replace(".", "_")
    return checkpoint.with_name(f"{name}_{analysis}")


def _outputs(out: Path, force: bool) -> tuple[Path, Path]:
    """STEM.csv and STEM.png, checked before any work (no overwrite without --force)."""
    from kdtool.analyze import require_matplotlib
    from kdtool.io import check_output, require_name

    require_name(out, "--out", "pass a file stem, e.g. --out fig")
    # A stem may hold dots (runs/r18.v2); a .csv or .png given as --out names the stem too.
    stem = out.with_suffix("") if out.suffix.lower() in (".csv", ".png") else out
    paths = (check_output(stem.with_name(stem.name + ".csv"), force, "CSV"),
             check_output(stem.with_name(stem.name + ".png"), force, "plot"))
    require_matplotlib()
    return paths


def _report(result: dict, as_json: bool, title: str, columns: list[str], rows) -> None:
    """Print ``rows(result)`` as a table and the files written, or the result as JSON."""
    from kdtool import console

    def render(res):
        console.out.print(console.table(title, columns, rows(res)))
        console.out.print(f"wrote {res['png']} and {res['csv']}", markup=False)

    console.emit(result, as_json, render)


@analyze_app.command("toy")
def toy_cmd(
    out: OutStem = Path("toy"),
    samples: Annotated[int, typer.Option("--samples", help="Points of make_circles.")] = 1000,
    steps: Annotated[int, typer.Option("--steps", help="Full-batch Adam steps.")] = 600,
    noise_scale: Annotated[float, typer.Option(
        "--noise-scale", help="Std of the Gaussian noise inputs.")] = 1.0,
    force: Force = False,
    seed: Seed = 0,
    as_json: Json = False,
) -> None:
    """The appendix's toy problem (A.1, Fig. 1): noise embeddings on running vs current BN.

    Trains an MLP with two BatchNorm layers and a 2-D penultimate layer on concentric
    circles, then plots the real data, the Gaussian noise, and the 2-D embeddings of the
    real data (running statistics) and of the noise on running and on current statistics,
    with each set's mean distance to the real embedding.

    Example: [bold]kdtool analyze toy --out figures/toy[/bold]
    """
    from kdtool.analyze.toy import ToyConfig, run_toy, write_csv, write_png
    from kdtool.errors import KdtoolError

    for name, value in (("--samples", samples), ("--steps", steps)):
        if value < 2:
            raise KdtoolError(f"{name} must be >= 2, got {value}")
    csv_path, png_path = _outputs(out, force)
    r = run_toy(ToyConfig(samples=samples, steps=steps, noise_scale=noise_scale, seed=seed))
    write_csv(csv_path, r)
    write_png(png_path, r)
    result = {"csv": str(csv_path), "png": str(png_path), "train_accuracy": r["train_accuracy"],
              "summary": r["summary"]}
    _report(result, as_json, f"toy problem (train accuracy {r['train_accuracy']:.1f}%)",
            ["embedding", "mean distance to real", "predicted class 0 / 1"],
            lambda res: [[name, f"{x['mean_distance_to_real']:.3f}",
                          " / ".join(str(v) for v in x["predicted_class_share"])]
                         for name, x in res["summary"].items()])


@analyze_app.command("activations")
def activations_cmd(
    teacher: Annotated[Path, typer.Argument(help="A kdtool checkpoint with BatchNorm layers.")],
    data: Annotated[str, typer.Option("--data", help="Real images. " + DATA_HELP)],
    out: Annotated[Path | None, typer.Option(
        "--out", help="Output stem: writes STEM.png and STEM.csv.",
        show_default="NAME_activations beside the checkpoint")] = None,
    noise: Annotated[str, typer.Option(
        "--noise", help="gaussian, uniform or dead_leaves.")] = "gaussian",
    layers: Annotated[str | None, typer.Option(
        "--layers", help="Comma-separated module names (default: the top-level blocks that "
        "hold BatchNorm, e.g. bn1,layer1,layer2,layer3).")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Images per condition.")] = 512,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Batch whose statistics 'current BN' uses.")] = 256,
    force: Force = False,
    seed: Seed = 0,
    as_json: Json = False,
) -> None:
    """Per-layer activation distributions (appendix A.6, Figs. 5-8) for real data and noise.

    For each layer: the distribution of per-channel mean activations of real images with
    BN on running statistics, of noise on running statistics and of noise on current
    statistics, and the Wasserstein-1 distance of each noise curve from the real one.

    Example: [bold]kdtool analyze activations teacher.safetensors --data digits:test --out
    figures/activations[/bold]
    """
    from kdtool.analyze.activations import ActivationsConfig, run_activations, write_png

    csv_path, png_path = _outputs(out or _beside(teacher, "activations"), force)
    names = [n for n in layers.split(",") if n] if layers else None
    r = run_activations(ActivationsConfig(teacher=str(teacher), data=data, noise=noise,
                                          layers=names, samples=samples, batch_size=batch_size,
                                          seed=seed))
    write_csv(csv_path, r["rows"])
    write_png(png_path, r)
    result = {k: v for k, v in r.items() if k != "values"} | {"csv": str(csv_path),
                                                              "png": str(png_path)}
    _report(result, as_json, f"activations of {r['arch']} ({r['images']} images per condition)",
            ["layer", "condition", "W1 to real", "mean +- std"],
            lambda res: [[x["layer"], x["condition"], f"{x['wasserstein_to_real']:.4f}",
                          f"{x['mean']:.3f} +- {x['std']:.3f}"] for x in res["rows"]])


@analyze_app.command("student")
def student_cmd(
    student: Annotated[Path, typer.Argument(help="A noise-distilled student (before calibrate).")],
    data: Annotated[str, typer.Option("--data", help="Real images to look at. " + DATA_HELP)],
    calib_data: Annotated[str | None, typer.Option(
        "--calib-data", help="Images to recalibrate BN on (default: --data).")] = None,
    batches: Annotated[int, typer.Option("--batches", help="Calibration batches.")] = 32,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Calibration batch.")] = 16,
    samples: Annotated[int, typer.Option("--samples", help="Images looked at.")] = 512,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Output stem: writes STEM.png and STEM.csv.",
        show_default="NAME_student beside the checkpoint")] = None,
    force: Force = False,
    seed: Seed = 0,
    as_json: Json = False,
) -> None:
    """A student's pooled features on real data (appendix A.3, Fig. 2): noise vs real BN.

    Compares the input of the student's classifier on real images with BN on its own
    (noise) running statistics, on current batch statistics, and recalibrated on a few real
    batches; with each curve's Wasserstein distance from the current-statistics one and,
    for labelled data, accuracy.

    Example: [bold]kdtool analyze student student.safetensors --data digits:test --calib-data
    digits --out figures/student[/bold]
    """
    from kdtool.analyze.student import StudentConfig, run_student, write_png

    csv_path, png_path = _outputs(out or _beside(student, "student"), force)
    r = run_student(StudentConfig(student=str(student), data=data, calib_data=calib_data,
                                  batches=batches, batch_size=batch_size, samples=samples,
                                  seed=seed))
    write_csv(csv_path, r["rows"])
    write_png(png_path, r)
    result = {k: v for k, v in r.items() if k != "values"} | {"csv": str(csv_path),
                                                              "png": str(png_path)}
    _report(result, as_json, f"{r['arch']} student: {r['features']}",
            ["BN statistics", "W1 to current", "top-1"],
            lambda res: [[x["state"], f"{x['wasserstein_to_current']:.4f}",
                          f"{x['top1']:.1f}%" if "top1" in x else "n/a"] for x in res["rows"]])


@analyze_app.command("sweep")
def sweep_cmd(
    teacher: Annotated[Path, typer.Option("--teacher", help="The teacher checkpoint.")],
    val: Annotated[str, typer.Option("--val", help="Labelled real data. " + DATA_HELP)],
    param: Annotated[str, typer.Option(
        "--param", help="running-fraction (Table 1) or batch-size (Fig. 3b).")
    ] = "running-fraction",
    values: Annotated[str | None, typer.Option(
        "--values", help="Comma-separated points.",
        show_default="0,0.25,0.5,0.75,1 for running-fraction, 16,32,64,128,256 for batch-size")
    ] = None,
    student: Annotated[str, typer.Option("--student", help="Student architecture.")
                       ] = "tiny_cnn",
    noise: Annotated[str, typer.Option("--noise", help="gaussian, uniform or dead_leaves.")
                     ] = "gaussian",
    epochs: Annotated[int, typer.Option("--epochs")] = 10,
    iters_per_epoch: Annotated[int, typer.Option("--iters-per-epoch")] = 100,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Batch of every point (batch-size sweeps keep the number of "
        "noise images of this batch x iterations).")] = 256,
    lr: Annotated[float, typer.Option("--lr", help="Adam one-cycle peak rate.")] = 0.01,
    keep: Annotated[str | None, typer.Option(
        "--keep", help="batch-size sweeps: keep the number of noise 'images' (fewer steps for "
        "larger batches) or of optimiser 'steps' (more images for larger batches).",
        show_default="images")
    ] = None,
    out: Annotated[Path, typer.Option(
        "--out", help="Output stem: writes STEM.png and STEM.csv, and the students in "
        "STEM/.")] = Path("sweep"),
    force: Force = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue an interrupted sweep with the same --out and settings: "
        "finished points are read back, the interrupted one continues from its last epoch, "
        "the rest run.")] = False,
    seed: Seed = 0,
    seeds: Annotated[int, typer.Option(
        "--seeds", help="Runs per point, with seeds --seed, --seed + 1, ...: the plot shows "
        "their mean and range. On digits one run's top-1 moves by a few points with its "
        "seed, as much as between neighbouring points.")] = 1,
    device: Device = "auto",
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Distil once per point and seed and plot student accuracy (Table 1 and Fig. 3b of the
    paper).

    --param running-fraction: the share P of the teacher's BN layers kept on running
    statistics (0 = the method, 1 = classic KD). --param batch-size: the noise batch whose
    statistics the teacher uses, at a constant number of noise images. Each run's student
    is kept in STEM/; an interrupted sweep continues with --resume. The students learn with
    the paper's plain loss (distill --balance off), as the paper's figures did.

    Example: [bold]kdtool analyze sweep --teacher teacher.safetensors --val digits:test
    --param running-fraction --values 0,0.25,0.5,0.75,1 --seeds 3 --out figures/table1[/bold]
    """
    from kdtool.analyze.sweep import DEFAULT_VALUES, KEEP, PARAMS, run_sweep, summarise, write_png
    from kdtool.cli.options import parse_floats
    from kdtool.device import cpu_threads
    from kdtool.distill.loop import DistillConfig
    from kdtool.errors import KdtoolError, check_choice

    check_choice(param, list(PARAMS), "sweep parameter")
    points = parse_floats(values or DEFAULT_VALUES[param], "--values", distinct=True)
    if keep is not None:
        check_choice(keep, KEEP, "--keep")
    if keep is not None and param != "batch-size":
        raise KdtoolError(f"--keep {keep} applies to batch-size sweeps, not {param}",
                          "drop --keep, or sweep --param batch-size")
    keep = keep or "images"
    if force and resume:
        raise KdtoolError("--force and --resume contradict each other",
                          "--resume continues the sweep in --out; --force starts it over")
    csv_path, png_path = _outputs(out, force or resume)  # a resumed sweep rewrites its summary
    base = DistillConfig(teacher=str(teacher), student=student, noise=noise, epochs=epochs,
                         iters_per_epoch=iters_per_epoch, batch_size=batch_size,
                         schedule="onecycle", lr=lr, val=val, seed=seed, device=device,
                         balance="off")  # the paper's figures: its plain loss
    try:
        with cpu_threads(threads):
            rows = run_sweep(base, param, points, out, keep, force=force, resume=resume,
                             seeds=seeds)
    except KeyboardInterrupt as e:
        from kdtool.interrupts import Stopped

        raise Stopped(e, "finished points and every finished epoch are saved; continue "
                      "with the same command and --resume") from None
    write_csv(csv_path, rows)
    budget = {"steps": ", equal optimiser steps", "images": ", equal noise images"}
    write_png(png_path, rows, f"{student} from {teacher.name}, {noise} noise"
              + (budget[keep] if param == "batch-size" else ""), val)
    result = {"param": param, "keep": keep, "seeds": seeds, "rows": rows,
              "points": summarise(rows), "csv": str(csv_path), "png": str(png_path)}

    def score(p: dict, key: str) -> str:
        spread = f" ({p[key + '_min']:.1f}-{p[key + '_max']:.1f})" if p["seeds"] > 1 else ""
        return f"{p[key]:.1f}%{spread}"

    _report(result, as_json, f"sweep of {param}" + (f", mean of {seeds} seeds (min-max)"
                                                     if seeds > 1 else ""),
            [param, "current BN", "running BN", "time"],
            lambda res: [[f"{p['value']:g}", score(p, "val_top1_current"),
                          score(p, "val_top1_running"), f"{p['seconds']:.0f} s"]
                         for p in res["points"]])


@analyze_app.command("curves")
def curves_cmd(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Outputs of kdtool train or kdtool distill (finished, or still running: the "
        "output is rewritten after every epoch), drawn on shared axes.")],
    labels: Annotated[str | None, typer.Option(
        "--labels", help="Comma-separated legend names, one per checkpoint (default: file "
        "names).")] = None,
    stage: Annotated[str | None, typer.Option(
        "--stage", help="train or distill: which recorded history to draw (default: the "
        "latest).")] = None,
    x: Annotated[str, typer.Option(
        "--x", help="Draw against 'epoch', 'images' seen or 'seconds' of steps (validation "
        "excluded): the last two compare runs of other batch sizes or speeds.")] = "epoch",
    title: Annotated[str | None, typer.Option("--title", help="Figure title.")] = None,
    out: OutStem = Path("curves"),
    force: Force = False,
    as_json: Json = False,
) -> None:
    """Learning curves of train and distill runs: loss, top-1, teacher agreement, lr.

    Reads the per-epoch history a run records in its checkpoint: nothing is recomputed, no
    data is needed. The CSV holds every recorded number, one row per run, epoch and metric.

    Example: [bold]kdtool analyze curves gauss.safetensors leaves.safetensors --labels
    Gaussian,"dead leaves" --out figures/noise_curves[/bold]
    """
    from kdtool.analyze.curves import (
        HISTORY_STAGES,
        X_AXES,
        load_runs,
        long_rows,
        summary,
        write_png,
    )
    from kdtool.errors import check_choice

    if stage is not None:
        check_choice(stage, HISTORY_STAGES, "--stage")
    check_choice(x, X_AXES, "--x")
    names = [name.strip() for name in labels.split(",")] if labels is not None else None
    runs = load_runs(checkpoints, names, stage)
    csv_path, png_path = _outputs(out, force)
    write_csv(csv_path, long_rows(runs))
    write_png(png_path, runs, title, x)
    result = {"x": x, "runs": [summary(r) for r in runs], "csv": str(csv_path),
              "png": str(png_path)}

    def table_rows(res):
        def val(s):
            if "val_best" not in s:
                return ["n/a", "n/a"]
            return [f"{s['val_last']:.2f}%", f"{s['val_best']:.2f}% ({s['val_best_epoch']})"]
        return [[s["run"], f"{s['epoch']}/{s['epochs'] or '?'}", f"{s['images']:,}",
                 f"{s['seconds']:.1f} s", f"{s['loss']:.4f}", *val(s)] for s in res["runs"]]

    stages = " / ".join(sorted({r.stage for r in runs}))
    _report(result, as_json, f"learning curves ({stages})",
            ["run", "epoch", "images", "step time", "loss", "val top-1", "best (epoch)"],
            table_rows)
