"""What ``kdtool bench`` runs: model files, the backends that run them, and their runners.

Runners are ``kdtool.export.runners`` (the ones ``kdtool export`` checks parity with):
one ``infer`` call goes from a host numpy batch to host numpy logits, so every backend
is timed on the same work, transfers included.  Nothing falls back silently: a backend
whose library, GPU or ONNX Runtime provider is missing, or that did not start, is
``BackendUnavailable`` with the reason.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdtool.errors import InternalError, KdtoolError, check_choice, check_threads, message_line
from kdtool.export.formats import GPU_EXTRA_HINT
from kdtool.export.ort_session import ORT_TARGETS
from kdtool.io import require_file

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
ONNX_SUFFIXES = (".onnx",)
TRT_SUFFIXES = (".plan", ".engine", ".trt")

# backend -> (the kind of model file it runs, ONNX Runtime providers in priority order)
BACKENDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch-cpu": ("checkpoint", ()),
    "torch-cuda": ("checkpoint", ()),
    **{f"ort-{target}": ("onnx", providers) for target, providers in ORT_TARGETS.items()},
    "trt": ("trt", ()),
}


class BackendUnavailable(Exception):
    """This backend cannot run here (missing library, GPU or provider); the reason says which."""


@dataclass
class BenchModel:
    """A model file and what is needed to feed it: kind, input, normalisation, classes."""

    path: Path
    kind: str  # checkpoint | onnx | trt
    file_bytes: int
    in_chans: int
    input_size: list[int]
    mean: list[float]
    std: list[float]
    num_classes: int
    class_names: list[str] = field(default_factory=list)
    arch: str = ""
    precision: str = "fp32"
    layout: str = "NCHW"
    input_dtype: str = "float32"
    fixed_batch: int | None = None  # a static batch dimension
    input_name: str = ""
    output_name: str = ""
    crop_fraction: float | None = None  # how images are fitted to input_size (None: stretch)
    interpolation: str = "bilinear"

    @property
    def label(self) -> str:
        return self.path.name

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """A normalised NCHW float32 batch in the layout and dtype the model takes."""
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def summary(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "file_bytes": self.file_bytes,
            "arch": self.arch,
            "precision": self.precision,
            "input": [self.in_chans, *self.input_size],
            "layout": self.layout,
            "num_classes": self.num_classes,
            "fixed_batch": self.fixed_batch,
        }


def model_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    for kind, suffixes in (
        ("checkpoint", CHECKPOINT_SUFFIXES),
        ("onnx", ONNX_SUFFIXES),
        ("trt", TRT_SUFFIXES),
    ):
        if suffix in suffixes:
            return kind
    raise KdtoolError(
        f"'{path}' is not a model file kdtool can run",
        "pass a kdtool checkpoint (.safetensors), an .onnx file or a TensorRT .plan engine",
    )


def load_model(path: str | Path) -> BenchModel:
    """Read a model file's description (not its weights): raises KdtoolError for bad input."""
    path = Path(path)
    kind = model_kind(path)
    require_file(path, "model")
    if kind == "checkpoint":
        return _checkpoint_model(path)
    if kind == "onnx":
        return _onnx_model(path)
    return _trt_model(path)


def _checkpoint_model(path: Path) -> BenchModel:
    from kdtool.checkpoint import read_meta

    meta = read_meta(path)
    uncalibrated = meta.noise_bn_warning(str(path))
    if uncalibrated:
        from kdtool import console

        console.warn(uncalibrated, once=True)
    from kdtool.export.metadata import OnnxInfo

    # A PyTorch model has no tensor names; the rest is what an export would record.
    info = OnnxInfo.from_meta(meta, input_name="", output_name="")
    return _from_info(path, "checkpoint", info, path.stat().st_size)


def _from_info(path: Path, kind: str, info, file_bytes: int) -> BenchModel:
    uncalibrated = info.noise_bn_warning(str(path)) if kind != "checkpoint" else None
    if uncalibrated:  # the checkpoint's own warning is said by _checkpoint_model
        from kdtool import console

        console.warn(uncalibrated, once=True)
    return BenchModel(
        path=path,
        kind=kind,
        file_bytes=file_bytes,
        in_chans=info.in_chans,
        input_size=list(info.input_size),
        mean=list(info.mean),
        std=list(info.std),
        num_classes=info.num_classes,
        class_names=list(info.class_names),
        arch=info.arch,
        precision=info.precision,
        layout=info.layout,
        input_dtype=info.input_dtype,
        fixed_batch=info.batch,
        input_name=info.input_name,
        output_name=info.output_name,
        crop_fraction=info.crop_fraction,
        interpolation=info.interpolation,
    )


def _onnx_model(path: Path) -> BenchModel:
    import onnx

    from kdtool.export.metadata import check_graph, info_from_props, load_proto, proto_io

    proto = load_proto(path)
    info = info_from_props({p.key: p.value for p in proto.metadata_props}, str(path))
    check_graph(info, *proto_io(proto), str(path))
    # Weights stored outside the .onnx (models over 2 GB) count towards the model's size.
    external = {
        e.value
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    size = path.stat().st_size + sum(
        (path.parent / loc).stat().st_size for loc in external if (path.parent / loc).is_file()
    )
    return _from_info(path, "onnx", info, size)


def plan_info_paths(path: Path) -> list[Path]:
    """Where a TensorRT engine's kdtool metadata may be: a JSON sidecar, or the source ONNX."""
    return [
        path.with_name(path.name + ".json"),
        path.with_suffix(".json"),
        path.with_suffix(".onnx"),
    ]


def _trt_model(path: Path) -> BenchModel:
    return _from_info(path, "trt", engine_info(path), path.stat().st_size)


def engine_info(path: Path):
    """A TensorRT engine's kdtool metadata (``OnnxInfo``), from the JSON sidecar or the
    ONNX that kdtool export wrote beside it (an engine file has no room for it)."""
    from kdtool.export.metadata import OnnxInfo, read_info

    for candidate in plan_info_paths(path):
        if not candidate.is_file():
            continue
        if candidate.suffix == ".onnx":
            return read_info(candidate)
        try:
            sidecar = json.loads(candidate.read_text())
        except (OSError, ValueError) as e:
            raise KdtoolError(f"cannot read the engine's sidecar '{candidate}': {e}") from e
        if not isinstance(sidecar, dict):
            continue
        # The sidecar holds the ONNX metadata under "kdtool" (or is that object itself), or
        # names the ONNX the engine was built from (kdtool export's sidecar does).
        d = sidecar.get("kdtool", sidecar)
        if isinstance(d, dict) and "input_name" in d:
            return OnnxInfo.from_json(json.dumps(d), str(candidate))
        source = candidate.parent / str(sidecar.get("onnx", ""))
        if sidecar.get("onnx") and source.is_file():
            return read_info(source)
    raise KdtoolError(
        f"TensorRT engine '{path}' has no kdtool metadata next to it",
        "keep the JSON sidecar or the .onnx that kdtool export wrote beside the engine "
        f"(looked for {', '.join(p.name for p in plan_info_paths(path))})",
    )


def check_backend(name: str) -> str:
    return check_choice(name, list(BACKENDS), "backend")


def backend_problem(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine, or None when it can (cheap probe)."""
    providers = BACKENDS[backend][1]
    if backend == "torch-cuda" or backend == "trt":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False)"
    if backend == "trt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return f"TensorRT is not installed ({GPU_EXTRA_HINT})"
    if providers and providers[0] != "CPUExecutionProvider":
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers[0] not in available:
            return (
                f"this onnxruntime build has no {providers[0]} (it has "
                f"{', '.join(available)}; {GPU_EXTRA_HINT})"
            )
    return None


class BenchRunner:
    """A runner of ``kdtool.export.runners`` as the benchmark sees it.

    ``infer`` is the export runner's own bound method (nothing added to the timed call);
    ``batch_problem`` says why a batch size cannot run, ``describe`` gives the providers
    actually active, the device and the runtime.
    """

    def __init__(self, inner, backend: str, restore=None):
        self.inner = inner
        self.backend = backend
        self.infer = inner.infer
        self._restore = restore

    def infer_whole(self, x: np.ndarray, batch: int) -> np.ndarray:
        """``infer`` on ``x``, first filled up to ``batch`` with copies of its last row when
        the runner cannot take ``len(x)`` (a static batch, an engine profile's least); the
        copies' answers are dropped."""
        n = len(x)
        if n < batch and self.batch_problem(n):
            x = np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)])
        return self.infer(x)[:n]

    def batch_problem(self, batch: int) -> str | None:
        fixed = self.inner.fixed_batch
        if fixed is not None:
            return None if batch == fixed else f"the model has a static batch of {fixed}"
        lo, hi = self.inner.batch_range
        if batch < lo or (hi is not None and batch > hi):
            return f"batch {batch} is outside the engine's profile ({lo}..{hi})"
        return None

    def describe(self) -> dict[str, Any]:
        d = dict(self.inner.describe())
        for key in ("backend", "input", "output", "fixed_batch", "model"):
            d.pop(key, None)
        if self.backend.startswith("torch-"):
            import torch

            runtime, device = f"torch {torch.__version__}", d.pop("device")
        elif self.backend.startswith("ort-"):
            import onnxruntime as ort

            runtime, device = f"onnxruntime {ort.__version__}", self.backend.removeprefix("ort-")
        else:
            runtime, device = f"tensorrt {d.pop('tensorrt')}", d.pop("device")
        return {
            "providers": list(d.pop("providers", [])),
            "device": device,
            "runtime": runtime,
            **d,
        }

    def close(self) -> None:
        self.inner.close()
        if self._restore is not None:
            self._restore()


def int8_caveat(described: dict) -> str | None:
    """What eval and predict say when the int8 weights ran as uint8 (x86 without VNNI):
    their figures are the INT8 model's own, which a plain ONNX Runtime session on this CPU
    does not reproduce."""
    weights = described.get("int8_weights")
    if not weights:
        return None
    return (f"{weights}; these are the INT8 model's own outputs, as VNNI x86 and ARM CPUs "
            "compute them; a plain ONNX Runtime session on this CPU saturates some int8 "
            "products and can score differently (docs/BENCHMARKS.md)")


def make_runner(model: BenchModel, backend: str, threads: int | None = None,
                memory_arena: bool = True) -> BenchRunner:
    """Load ``model`` on ``backend`` with the export runners.

    BackendUnavailable when it cannot run here: the probe failed, or a GPU backend did
    not start (a provider ONNX Runtime did not activate, an engine this TensorRT or GPU
    cannot load). A KdtoolError on a CPU backend is a broken model: the row fails.
    """
    from kdtool.export import runners

    check_threads(threads)
    problem = backend_problem(backend)
    if problem:
        raise BackendUnavailable(problem)
    restore = None
    try:
        with warnings.catch_warnings():  # ORT warns on a provider fallback; the runner checks
            warnings.simplefilter("ignore")
            if backend.startswith("torch-"):
                import torch

                before = torch.get_num_threads()  # process-wide: restored on close
                if threads:
                    torch.set_num_threads(threads)
                    restore = lambda: torch.set_num_threads(before)  # noqa: E731
                inner = runners.TorchRunner.from_checkpoint(model.path, backend[6:])
            elif backend.startswith("ort-"):
                inner = runners.OrtRunner(
                    model.path, providers=BACKENDS[backend][1], threads=threads,
                    memory_arena=memory_arena,
                )
            else:
                inner = runners.TrtRunner(model.path)
    except BaseException as e:  # the thread count is process-wide: never left changed
        if restore is not None:
            restore()
        if not isinstance(e, KdtoolError) or backend in ("torch-cpu", "ort-cpu"):
            raise
        raise BackendUnavailable(str(e)) from e
    return BenchRunner(inner, backend, restore)


# Errors of Python code itself: kdtool's bugs, which keep their traceback rather than
# become a "failed" row (a runtime that refuses a model raises its own types instead).
PROGRAMMING_ERRORS = (AttributeError, NameError, TypeError, KeyError, IndexError,
                      AssertionError, InternalError)


def first_line(e: BaseException) -> str:
    """A row's reason: a user error's own line, else the exception's type and line."""
    text = message_line(e)
    if isinstance(e, KdtoolError):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
