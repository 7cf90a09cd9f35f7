"""``kdtool export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli.app import app
from kdtool.cli.options import DATA_HELP, Force, Json, Seed, Threads

_ONNX = "ONNX"
_INT8 = "INT8"
_TRT = "TensorRT and Triton"


@app.command("export")
def export_cmd(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="A kdtool checkpoint (normally the calibrated, BN-folded student)."),
    ],
    onnx: Annotated[Path | None, typer.Option(
        "--onnx", "--out", help="ONNX file to write.",
        show_default="beside CHECKPOINT: its name with .onnx, .fp16.onnx or .int8.onnx")
    ] = None,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="fp32, fp16 (FP16 graph, float32 input/output) or int8 (static "
            "QDQ; needs --calib-data).",
        ),
    ] = "fp32",
    batch: Annotated[
        str,
        typer.Option(
            "--batch",
            help="MIN:OPT:MAX: dynamic batch (ONNX), TensorRT profile and Triton "
            "max_batch_size; N: a static batch of N.",
            rich_help_panel=_ONNX,
        ),
    ] = "1:32:256",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.", rich_help_panel=_ONNX)] = 18,
    exporter: Annotated[
        str,
        typer.Option(
            "--exporter",
            help="dynamo (torch's default) or torchscript (deprecated by torch; "
            "much faster to export, for models dynamo cannot trace).",
            rich_help_panel=_ONNX,
        ),
    ] = "dynamo",
    slim: Annotated[
        bool,
        typer.Option(
            "--slim/--no-slim",
            help="Simplify the graph with onnxslim when it is installed.",
            rich_help_panel=_ONNX,
        ),
    ] = True,
    val: Annotated[
        str | None,
        typer.Option(
            "--val",
            help="Labelled images: parity runs on them and accuracy of PyTorch vs the "
            "export is reported. " + DATA_HELP,
        ),
    ] = None,
    parity_batch: Annotated[
        int,
        typer.Option(
            "--parity-batch", help="The larger of the two parity batches (the other is 1)."
        ),
    ] = 64,
    min_agreement: Annotated[
        float | None,
        typer.Option(
            "--min-agreement",
            help="Top-1 agreement (%) FP16/INT8 parity needs (default: fp16 95, int8 90).",
        ),
    ] = None,
    calib_data: Annotated[
        str | None,
        typer.Option(
            "--calib-data",
            help="INT8 calibration images (labels not needed; only the --calib-images "
            "drawn are decoded). " + DATA_HELP,
            rich_help_panel=_INT8,
        ),
    ] = None,
    calib_images: Annotated[
        int | None,
        typer.Option(
            "--calib-images",
            help="Calibration images used (a seeded random choice).",
            show_default="512, or all there are when fewer",
            rich_help_panel=_INT8,
        ),
    ] = None,
    calib_method: Annotated[
        str | None,
        typer.Option(
            "--calib-method", help="minmax (the full range), entropy (thresholds by minimal KL "
            "divergence, as TensorRT's; slower) or percentile (99.999th).", show_default="minmax",
            rich_help_panel=_INT8,
        ),
    ] = None,
    int8_activations: Annotated[
        str | None,
        typer.Option(
            "--int8-activations",
            help="symmetric (int8, zero point 0: valid for TensorRT; kdtool's ONNX Runtime "
            "CPU sessions run it as uint8, same values) or asymmetric (uint8 with zero "
            "points: fast in any ONNX Runtime CPU session, not for TensorRT).",
            show_default="symmetric",
            rich_help_panel=_INT8,
        ),
    ] = None,
    trt: Annotated[
        bool,
        typer.Option(
            "--trt",
            help="Also build a TensorRT engine (needs TensorRT 10/11 and a CUDA GPU).",
            rich_help_panel=_TRT,
        ),
    ] = False,
    engine: Annotated[
        Path | None,
        typer.Option(
            "--engine",
            help="Engine file (default: the ONNX path with .engine).",
            rich_help_panel=_TRT,
        ),
    ] = None,
    workspace: Annotated[
        float | None,
        typer.Option(
            "--workspace", help="TensorRT builder workspace limit, GiB (default: 4).",
            rich_help_panel=_TRT
        ),
    ] = None,
    timing_cache: Annotated[
        Path | None,
        typer.Option(
            "--timing-cache",
            help="TensorRT timing cache, reused across builds (default: one "
            "per TensorRT version and GPU under ~/.cache/kdtool/tensorrt).",
            rich_help_panel=_TRT,
        ),
    ] = None,
    triton_repo: Annotated[
        Path | None,
        typer.Option(
            "--triton-repo",
            help="Write a Triton model repository here (model.onnx, or model.plan with --trt).",
            rich_help_panel=_TRT,
        ),
    ] = None,
    triton_name: Annotated[
        str | None,
        typer.Option(
            "--triton-name",
            help="Model name in the repository (default: the ONNX file's stem).",
            rich_help_panel=_TRT,
        ),
    ] = None,
    force: Force = False,
    seed: Seed = 0,
    threads: Threads = None,
    as_json: Json = False,
) -> None:
    """Export a checkpoint to ONNX (FP32, FP16 or INT8), TensorRT and Triton, each verified.

    The ONNX file is checked against PyTorch at batch 1 and --parity-batch (on --val or
    --calib-data images, else seeded noise): FP32 must match to 1e-3 of the logits'
    scale, FP16 and INT8 by top-1 agreement. A failed check exits 1 and writes nothing
    (files are built aside and moved into place only when they pass). The ONNX carries
    kdtool's metadata (classes, mean/std, input size, precision, source hash), which
    'kdtool bench' and 'kdtool serve' read. Without TensorRT or a GPU, --trt writes the
    ONNX and then exits 1 saying what is missing.

    Example: [bold]kdtool export student.cal.safetensors --precision int8 --calib-data calib/
    --val val/ --triton-repo models/[/bold] (writes student.cal.int8.onnx)
    """
    from kdtool import console
    from kdtool.device import cpu_threads
    from kdtool.export.pipeline import ExportConfig, run_export

    # An option that would change nothing is refused, with what it belongs to.
    _refuse_unused({"--calib-images": calib_images, "--calib-method": calib_method,
                    "--int8-activations": int8_activations}, precision in ("fp32", "fp16"),
                   f"sets up INT8 quantisation, and --precision is {precision}",
                   "add --precision int8")
    _refuse_unused({"--engine": engine, "--workspace": workspace,
                    "--timing-cache": timing_cache}, not trt,
                   "configures the TensorRT build, and --trt is not given", "add --trt")
    _refuse_unused({"--triton-name": triton_name}, triton_repo is None,
                   "names the model in a Triton repository, and --triton-repo is not given",
                   "add --triton-repo DIR")
    _refuse_unused({"--min-agreement": min_agreement}, precision == "fp32" and not trt,
                   "sets the top-1 agreement FP16, INT8 and TensorRT builds need; an FP32 ONNX "
                   "is checked by its largest logit difference", "add --precision or --trt")
    if onnx is None:
        from kdtool.export.formats import onnx_format, onnx_path_for

        onnx = onnx_path_for(checkpoint, onnx_format(precision))
    defaults = ExportConfig(checkpoint="", onnx="")
    cfg = ExportConfig(
        checkpoint=str(checkpoint),
        onnx=str(onnx),
        precision=precision,
        batch=batch,
        opset=opset,
        exporter=exporter,
        slim=slim,
        calib_data=calib_data,
        calib_images=calib_images,
        calib_method=calib_method or defaults.calib_method,
        int8_activations=int8_activations or defaults.int8_activations,
        val=val,
        parity_batch=parity_batch,
        min_agreement=min_agreement,
        trt=trt,
        engine=str(engine) if engine else None,
        workspace=defaults.workspace if workspace is None else workspace,
        timing_cache=str(timing_cache) if timing_cache else None,
        triton_repo=str(triton_repo) if triton_repo else None,
        triton_name=triton_name,
        force=force,
        seed=seed,
        threads=threads,
    )
    with cpu_threads(threads):  # PyTorch's side; cfg.threads is ONNX Runtime's
        result = run_export(cfg)

    console.emit(result, as_json, _render)


def _render(r: dict) -> None:
    from kdtool import console

    rows = [
        [
            "onnx",
            f"{r['onnx']} ({r['precision']}, {r['sizes']['onnx_bytes'] / 1e6:.2f} MB"
            + (f"; fp32 {r['sizes']['fp32_bytes'] / 1e6:.2f} MB)"
               if r["precision"] != "fp32" else ")"),
        ],
        [
            "source",
            f"{r['checkpoint']} ({r['arch']}, "
            f"{'BN folded' if r['folded'] else 'BN not folded'})",
        ],
        ["batch", _batch_text(r["batch"])],
        ["parity inputs", r["parity_inputs"]],
    ]
    for name, p in r["parity"].items():
        rows.append(
            [
                f"parity {name} vs torch",
                f"max|diff| {p['max_abs_diff']:.3g}, top-1 agreement "
                f"{p['top1_agreement']:.1f}% ({p['images']} images)",
            ]
        )
    if "quantization" in r:
        q = r["quantization"]
        rows.append(
            [
                "int8",
                f"{q['activations']} activations, {q['weights']} weights, "
                f"{q['calib_images']} images ({q['calib_method']})",
            ]
        )
    if "cpu_caveat" in r:
        rows.append(["this CPU", r["cpu_caveat"]])
    if "val" in r:
        v = r["val"]
        exported = v[f"onnx_{r['precision']}_top1"]
        rows.append(
            [
                "val top-1",
                f"torch fp32 {v['torch_fp32_top1']:.2f}%, onnx "
                f"{r['precision']} {exported:.2f}% ({v['top1_change']:+.2f})",
            ]
        )
    if "tensorrt" in r:
        t = r["tensorrt"]
        rows.append(
            [
                "tensorrt",
                f"{t['engine']} (TensorRT {t['tensorrt_version']}, "
                f"{t['gpu']}, agreement {t['parity']['top1_agreement']:.1f}%)",
            ]
        )
    if "triton" in r:
        rows.append(["triton", f"{r['triton']['path']} ({r['triton']['platform']})"])
    console.print_kv("kdtool export", rows)


def _refuse_unused(given: dict, unused: bool, what: str, fix: str) -> None:
    """Refuse the first of ``given`` (option -> value, None when not given) if ``unused``."""
    from kdtool.errors import KdtoolError

    names = [name for name, value in given.items() if value is not None]
    if names and unused:
        raise KdtoolError(f"{names[0]} {what}", f"{fix}, or drop {names[0]}")


def _batch_text(b: dict) -> str:
    if b["static"]:
        return f"static {b['max']}"
    return f"dynamic, profile {b['min']}:{b['opt']}:{b['max']}"
