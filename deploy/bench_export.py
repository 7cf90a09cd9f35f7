"""``kdtool bench --formats``: export each checkpoint on the fly with ``kdtool export``.

Each format is one ``kdtool.export.pipeline.run_export`` call, with its parity checks
against PyTorch; a format that cannot be made (INT8 without calibration images,
a parity failure) becomes an ``export failed`` row instead of stopping the benchmark. A
format whose runner cannot run on this machine (TensorRT without TensorRT or a GPU) is not
made at all: its rows are ``unavailable``, as that backend's rows are for a given file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kdtool.errors import KdtoolError, check_choice
from kdtool.export.formats import FORMATS as EXPORT_FORMATS
from kdtool.export.formats import ExportFormat, onnx_path_for

TORCH = "torch"  # the checkpoint itself, run by PyTorch: not an export
# The backend a format's rows go under (when its export fails too), by its runner.
_BACKEND_OF_RUNNER = {"onnxruntime": "ort-cpu", "tensorrt": "trt"}
# What bench can make and run: export's table, less what no runner executes (Triton).
BENCH_FORMATS: dict[str, ExportFormat] = {
    name: f for name, f in EXPORT_FORMATS.items() if f.runner in _BACKEND_OF_RUNNER}


@dataclass
class Exported:
    checkpoint: Path
    format: str
    path: Path  # the file written (or that would have been)
    error: str | None = None
    seconds: float = 0.0
    reused: bool = False  # an earlier run's export of the same checkpoint, same settings
    unavailable: str | None = None  # why its runner cannot run here: not made at all

    @property
    def backend(self) -> str:
        if self.format == TORCH:
            return "torch-cpu"
        return _BACKEND_OF_RUNNER[BENCH_FORMATS[self.format].runner]

    def summary(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "format": self.format,
            "path": str(self.path),
            "status": "export failed" if self.error else "unavailable" if self.unavailable
            else "reused" if self.reused else "ok",
            "reason": self.error or self.unavailable or "",
            "seconds": round(self.seconds, 2),
        }


def check_formats(formats: list[str]) -> list[str]:
    return [check_choice(f, [TORCH, *BENCH_FORMATS], "bench format") for f in formats]


def needs_calib(formats: list[str]) -> bool:
    return any(f != TORCH and BENCH_FORMATS[f].needs_calib for f in formats)


def export_all(
    checkpoint: Path,
    formats: list[str],
    out_dir: Path,
    calib_data: str | None,
    force: bool,
    threads: int | None,
) -> list[Exported]:
    """``checkpoint`` in each of ``formats`` (``torch`` = the checkpoint itself)."""
    from rich.markup import escape

    from kdtool import console
    from kdtool.deploy.backends import backend_problem
    from kdtool.export.pipeline import ExportConfig, run_export
    from kdtool.io import file_sha256

    done, source_sha256 = [], None
    for fmt in formats:
        if fmt == TORCH:
            done.append(Exported(checkpoint, fmt, checkpoint))
            continue
        row = BENCH_FORMATS[fmt]
        trt = row.needs_tensorrt
        onnx = onnx_path_for(checkpoint, row, out_dir)
        target = onnx.with_suffix(row.suffix)  # the engine: <stem>.trt.engine
        problem = backend_problem(_BACKEND_OF_RUNNER[row.runner])
        if problem is not None:  # an engine nothing here can build or run: no files either
            console.info(f"bench: {fmt} not made: {problem}")
            done.append(Exported(checkpoint, fmt, target, unavailable=problem))
            continue
        cfg = ExportConfig(
            checkpoint=str(checkpoint),
            onnx=str(onnx),
            precision=row.precisions[0],  # an engine: of the FP32 graph
            calib_data=calib_data if row.needs_calib else None,
            trt=trt,
            force=force,
            threads=threads,
        )
        if not force and target.is_file():
            source_sha256 = source_sha256 or file_sha256(checkpoint)  # once per checkpoint
            # An engine takes minutes to build (tens on a Jetson): reused as an ONNX is, when
            # built from this checkpoint for this GPU and TensorRT.
            made = _engine_made_by_this_export if trt else _made_by_this_export
            if made(target, source_sha256, cfg):
                console.info(f"bench: reusing {target}, exported from this {checkpoint.name} "
                             f"as {fmt}")
                done.append(Exported(checkpoint, fmt, target, reused=True))
                continue
        console.info(f"bench: exporting {checkpoint.name} as {fmt}")
        start = time.perf_counter()
        try:
            run_export(cfg)
            done.append(Exported(checkpoint, fmt, target, seconds=time.perf_counter() - start))
        except KdtoolError as e:
            console.warn(escape(f"export of {checkpoint.name} as {fmt} failed: {e}"))
            done.append(Exported(checkpoint, fmt, target, str(e), time.perf_counter() - start))
    return done


def _engine_made_by_this_export(engine: Path, source_sha256: str, cfg) -> bool:
    """Whether ``engine``'s sidecar says it was built from ``cfg``'s export of the same
    checkpoint bytes, at its precision, by this TensorRT for this GPU (an engine runs on
    the GPU model and TensorRT version that built it, and no other)."""
    import json

    from kdtool.export.engine import engine_identity, sidecar_path

    try:
        record = json.loads(sidecar_path(engine).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or not isinstance(record.get("kdtool"), dict):
        return False
    trt_version, gpu = engine_identity()
    return (record["kdtool"].get("source_sha256") == source_sha256
            and record.get("precision") == cfg.precision
            and record.get("tensorrt_version") == trt_version and record.get("gpu") == gpu)


def _made_by_this_export(onnx: Path, source_sha256: str, cfg) -> bool:
    """Whether ``onnx`` is what ``cfg`` would write: the same checkpoint bytes (their
    SHA-256), precision and calibration data (so a rerun of a bench with --export-dir
    reuses its exports)."""
    from kdtool.export.metadata import read_info

    try:
        info = read_info(onnx)
    except KdtoolError:  # not a kdtool export: run_export refuses to overwrite it
        return False
    quantization = info.quantization or {}
    return (info.source_sha256 == source_sha256 and info.precision == cfg.precision
            and quantization.get("calib_data") == cfg.calib_data
            and quantization.get("calib_seed", cfg.seed) == cfg.seed)
