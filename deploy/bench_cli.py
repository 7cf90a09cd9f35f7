"""``kdtool bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli.app import app
from kdtool.cli.options import DATA_HELP, Force, Json, Seed, Threads
from kdtool.export.ort_session import MEMORY_ARENA_HELP


def parse_ints(text: str, option: str) -> list[int]:
    from kdtool.cli.options import parse_list

    values = parse_list(text, option, int, "1,8,64", "integers")
    return list(dict.fromkeys(values))  # keeps order, drops repeats


@app.command("bench")
def bench_cmd(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="Model files: kdtool checkpoints (.safetensors), .onnx files with kdtool "
            "metadata, TensorRT engines (.engine, .plan, .trt; metadata from the sidecar "
            "kdtool export writes).",
            show_default=False,
        ),
    ],
    backends: Annotated[
        str,
        typer.Option(
            "--backends",
            help="Comma-separated: torch-cpu, torch-cuda (checkpoints); ort-cpu, "
            "ort-cuda, ort-trt (ONNX Runtime execution providers); trt (engines). auto: every "
            "backend that fits a file and runs here. A named backend that cannot run here gets a "
            "row saying why; one that fits none of the files is an error.",
        ),
    ] = "auto",
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, e.g. 1,8,64.")] = "1,8,64",
    warmup: Annotated[
        int,
        typer.Option("--warmup", help="Warm-up calls per cell (stopped after half of --min-time)."),
    ] = 10,
    min_time: Annotated[
        float,
        typer.Option(
            "--min-time", help="Seconds of timed calls per backend x batch cell, at least."
        ),
    ] = 1.0,
    min_iters: Annotated[
        int, typer.Option("--min-iters", help="Timed calls per cell, at least.")
    ] = 10,
    threads: Threads = None,
    memory_arena: Annotated[
        bool,
        typer.Option("--memory-arena/--no-memory-arena", help=MEMORY_ARENA_HELP),
    ] = True,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Labelled data for top-1 accuracy, resized to each model's input. " + DATA_HELP,
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", help="Use a seeded random subset of N images of --data (a "
                     "folder or zip decodes only those)."),
    ] = None,
    min_accuracy: Annotated[
        float | None,
        typer.Option("--min-accuracy", help="Fail a row whose top-1 (%) is below this."),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop",
            help="Fail a row whose top-1 is more than this many points below the "
            "reference (the first row with an accuracy: put the checkpoint first).",
        ),
    ] = None,
    formats: Annotated[
        str | None,
        typer.Option(
            "--formats",
            help="Export each checkpoint on the fly with kdtool export (parity "
            "checked) and bench the results: torch (the checkpoint itself), onnx, onnx-fp16, "
            "onnx-int8, tensorrt. A format that fails to export gets an 'export failed' row; "
            "tensorrt where TensorRT cannot run is not made and its rows are 'unavailable'.",
            rich_help_panel="Export on the fly",
        ),
    ] = None,
    export_dir: Annotated[
        Path | None,
        typer.Option(
            "--export-dir",
            help="Keep the exports here (default: a temporary folder).",
            rich_help_panel="Export on the fly",
        ),
    ] = None,
    calib_data: Annotated[
        str | None,
        typer.Option(
            "--calib-data",
            help="Calibration images for onnx-int8. " + DATA_HELP,
            rich_help_panel="Export on the fly",
        ),
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Write the table as Markdown to this file.")
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="Plot latency and throughput against batch size (.png, .svg, .pdf)."
        ),
    ] = None,
    force: Force = False,
    seed: Seed = 0,
    as_json: Json = False,
) -> None:
    """Measure latency, throughput, memory and accuracy of models across backends.

    Per model x backend x batch size: warm-up, then timed calls for at least --min-time
    seconds; p50/p90/p99 latency, images/s, peak memory, file size, and with --data top-1
    accuracy. A row is ok, unavailable (with the reason: nothing falls back silently),
    failed, export failed (--formats) or accuracy failed (--min-accuracy, --max-drop).
    Exit 1 when a row failed or none ran.

    Example: [bold]kdtool bench student.cal.safetensors student.onnx --batch 1,64 --data
    digits:test --max-drop 1 --markdown bench.md --plot bench.png[/bold]
    """
    from kdtool import console
    from kdtool.deploy.bench import Bench, BenchConfig
    from kdtool.deploy.bench_report import check_plot_path, render, write_markdown, write_plot
    from kdtool.errors import KdtoolError
    from kdtool.io import REPORT, check_distinct, check_output

    chosen = (
        None
        if backends.strip() == "auto"
        else [b.strip() for b in backends.split(",") if b.strip()]
    )
    cfg = BenchConfig(
        models=[str(m) for m in models],
        backends=chosen,
        batches=tuple(parse_ints(batch, "--batch")),
        warmup=warmup,
        min_time=min_time,
        min_iters=min_iters,
        threads=threads,
        memory_arena=memory_arena,
        data=data,
        limit=limit,
        min_accuracy=min_accuracy,
        max_drop=max_drop,
        seed=seed,
        formats=None if formats is None else [f.strip() for f in formats.split(",") if f.strip()],
        export_dir=None if export_dir is None else str(export_dir),
        calib_data=calib_data,
        force=force,
    )
    cfg.check()
    # Refuse existing outputs before spending minutes measuring.
    check_distinct(markdown=markdown, plot=plot)
    if markdown is not None:
        check_output(markdown, force, "Markdown report", (".md", ".markdown"), REPORT)
    if plot is not None:
        check_plot_path(plot)
        check_output(plot, force, "plot")
    result = Bench(cfg).run()
    if markdown is not None:
        write_markdown(result, markdown)
        result["markdown"] = str(markdown)
    if plot is not None:
        write_plot(result, plot)
        result["plot"] = str(plot)
    failed = None
    if not result["ok"]:
        bad = [
            f"{r['model']} {r['backend']} batch {r['batch']}: {r['status']}"
            for r in result["rows"]
            if r["status"] not in ("ok", "unavailable")
        ]
        failed = KdtoolError(
            f"{len(bad)} benchmark row(s) did not pass, first: {bad[0]}" if bad else
            "no backend could run any of the models", "see the reasons under the table")
        # The one JSON object carries what every failure's object does, as predict's
        result.update(error=failed.message, hint=failed.hint)
    console.emit(result, as_json, render)
    for key, what in (("markdown", "Markdown table"), ("plot", "plot")):
        if key in result:
            console.info(f"wrote {what} {result[key]}")
    if failed is not None:
        raise failed
