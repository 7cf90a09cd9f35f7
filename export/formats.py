"""The export formats kdtool writes: one table that drives argument checks, export and bench.

Each row says what a format is, which file it makes, which precisions it carries, what
it needs (calibration images, TensorRT, a CUDA GPU) and which runner
(``kdtool.export.runners``) executes it. ``kdtool export`` validates its options against
this table, and ``kdtool bench`` iterates over it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from kdtool.errors import KdtoolError, check_choice
from kdtool.export.metadata import PRECISIONS

GPU_EXTRA_HINT = "pip install 'kdtool[gpu]' (TensorRT, onnxruntime-gpu) on a machine with a GPU"


@dataclass(frozen=True)
class ExportFormat:
    name: str
    title: str
    suffix: str  # of the file written ("" for a folder)
    precisions: tuple[str, ...]  # precisions this format carries
    runner: str | None  # "onnxruntime" / "tensorrt": the runner that executes it; None: a server
    needs_calib: bool = False  # --calib-data images
    needs_tensorrt: bool = False
    needs_gpu: bool = False
    cli: str = ""  # the flags that produce it
    # tells this format's ONNX apart from others of one model (bench --formats file names)
    tag: str = ""

    def missing(self) -> list[str]:
        """What this machine lacks to produce or run this format (empty: nothing)."""
        lacks = []
        if self.needs_tensorrt and importlib.util.find_spec("tensorrt") is None:
            lacks.append("the TensorRT Python package (tensorrt)")
        if self.needs_gpu and not _cuda_available():
            lacks.append("a CUDA GPU")
        return lacks


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat("onnx", "ONNX FP32", ".onnx", ("fp32",), "onnxruntime", cli="--onnx M.onnx"),
        ExportFormat(
            "onnx-fp16",
            "ONNX FP16 (float32 input and output)",
            ".onnx",
            ("fp16",),
            "onnxruntime",
            cli="--onnx M.onnx --precision fp16",
            tag=".fp16",
        ),
        ExportFormat(
            "onnx-int8",
            "ONNX INT8 QDQ (static, per-channel symmetric weights)",
            ".onnx",
            ("int8",),
            "onnxruntime",
            needs_calib=True,
            cli="--onnx M.onnx --precision int8 --calib-data DIR",
            tag=".int8",
        ),
        ExportFormat(
            "tensorrt",
            "TensorRT engine (precision of the ONNX graph)",
            ".engine",
            PRECISIONS,
            "tensorrt",
            needs_tensorrt=True,
            needs_gpu=True,
            cli="--onnx M.onnx --trt [--precision P] [--batch MIN:OPT:MAX]",
            tag=".trt",
        ),
        ExportFormat(
            "triton",
            "Triton model repository (ONNX or TensorRT plan)",
            "",
            PRECISIONS,
            None,
            cli="--onnx M.onnx --triton-repo DIR [--trt]",
        ),
    )
}

ONNX_FORMAT_BY_PRECISION = {"fp32": "onnx", "fp16": "onnx-fp16", "int8": "onnx-int8"}


def check_precision(precision: str) -> str:
    return check_choice(precision, PRECISIONS, "precision")


def onnx_format(precision: str) -> ExportFormat:
    """The ONNX row for ``precision`` (fp32, fp16 or int8)."""
    return FORMATS[ONNX_FORMAT_BY_PRECISION[check_precision(precision)]]


def onnx_path_for(checkpoint: Path, fmt: ExportFormat, folder: Path | None = None) -> Path:
    """Where ``fmt``'s ONNX of ``checkpoint`` goes unless told: ``<stem><tag>.onnx`` beside
    it (or in ``folder``), so each precision of one model has a name of its own."""
    return (folder or checkpoint.parent) / f"{checkpoint.stem}{fmt.tag}.onnx"


def get_format(name: str) -> ExportFormat:
    return FORMATS[check_choice(name, list(FORMATS), "export format")]


def require(fmt: ExportFormat, wrote: str | None = None, what: str | None = None) -> None:
    """Raise a KdtoolError naming what is missing for ``fmt`` and how to get it."""
    lacks = fmt.missing()
    if not lacks:
        return
    done = f"wrote {wrote}, but " if wrote else ""
    raise KdtoolError(
        f"{done}{what or fmt.title} needs {' and '.join(lacks)}, which this machine lacks",
        GPU_EXTRA_HINT,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
