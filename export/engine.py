"""TensorRT engines from kdtool's ONNX files, on TensorRT 10.x and 11.x.

TensorRT 10 (still what Jetson runs) builds weakly typed networks: reduced precision
is enabled by builder flags (FP16 for an FP16 graph, INT8 for a QDQ graph). TensorRT 11
removed those flags: every network is strongly typed and precision comes from the graph
itself. ``precision_plan`` makes that choice from the version string alone, so the
logic is testable without TensorRT; ``build_engine`` applies it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kdtool.errors import KdtoolError
from kdtool.export.batch import BatchProfile
from kdtool.export.formats import FORMATS, GPU_EXTRA_HINT, check_precision

MIN_TRT_MAJOR = 10
_FLAGS_V10 = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8",)}


def trt_major(version: str) -> int:
    m = re.match(r"\s*(\d+)\.", str(version) + ".")
    if not m:
        raise KdtoolError(f"cannot read the TensorRT version '{version}'")
    return int(m.group(1))


@dataclass(frozen=True)
class BuildPlan:
    """How to build an engine of one precision with one TensorRT version."""

    trt_version: str
    precision: str
    strongly_typed: bool  # TensorRT 11: always; the precision is the graph's
    builder_flags: tuple[str, ...]  # names of trt.BuilderFlag members to set (TensorRT 10)


def precision_plan(precision: str, trt_version: str) -> BuildPlan:
    """The network typing and builder flags for ``precision`` on TensorRT ``trt_version``."""
    precision = check_precision(precision)
    major = trt_major(trt_version)
    if major < MIN_TRT_MAJOR:
        raise KdtoolError(
            f"TensorRT {trt_version} is too old: kdtool builds engines with TensorRT 10 or 11",
            "pip install 'tensorrt>=10'",
        )
    if major == 10:
        return BuildPlan(trt_version, precision, False, _FLAGS_V10[precision])
    # 11 and later: no precision flags exist; the FP16 casts / Q-DQ nodes decide.
    return BuildPlan(trt_version, precision, True, ())


def engine_identity(trt=None) -> tuple[str, str]:
    """(TensorRT version, first GPU's name): what an engine is built for and runs on alone.
    Its sidecar records them; a reuse compares them (kdtool.deploy.bench_export)."""
    import torch

    trt = trt or import_tensorrt()
    return trt.__version__, torch.cuda.get_device_name(0)


def import_tensorrt():
    """``import tensorrt``, or a KdtoolError saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise KdtoolError(f"TensorRT is not installed ({e})", GPU_EXTRA_HINT) from e
    return trt


def torch_dtype(trt_dtype):
    """The torch dtype of a ``trt.DataType``."""
    import torch

    trt = import_tensorrt()
    table = {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT8": torch.int8,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
        "UINT8": torch.uint8,
    }
    for name, dtype in table.items():
        if getattr(trt.DataType, name, None) == trt_dtype:
            return dtype
    raise KdtoolError(f"TensorRT tensor type {trt_dtype} is not supported by kdtool's runner")


def default_timing_cache(trt_version: str, gpu: str) -> Path:
    """One timing cache per TensorRT version and GPU model, reused by every build."""
    root = os.environ.get("KDTOOL_CACHE") or "~/.cache/kdtool"
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", f"trt{trt_version}_{gpu}").strip("_")
    return Path(root).expanduser() / "tensorrt" / f"timing_{slug}.cache"


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    precision: str,
    profile: BatchProfile,
    workspace_gib: float = 4.0,
    timing_cache: Path | None = None,
    force: bool = False,
    log=print,
) -> dict:
    """Build ``engine_path`` from ``onnx_path``; return the sidecar record (versions, profile).

    The ONNX file is parsed from its path (so external weights resolve). Constant int32
    bias dequantisation in QDQ graphs is folded to float first (see
    ``precision.fold_bias_dequantize``).
    """
    import onnx
    import torch

    from kdtool.export.formats import require
    from kdtool.export.precision import fold_bias_dequantize

    require(FORMATS["tensorrt"])
    trt = import_tensorrt()
    plan = precision_plan(precision, trt.__version__)
    if workspace_gib <= 0:
        raise KdtoolError(f"--workspace must be positive, got {workspace_gib}")
    _, gpu = engine_identity(trt)

    source = onnx_path
    try:
        if precision == "int8":
            model = onnx.load(str(onnx_path))
            if fold_bias_dequantize(model):
                # Named as the engine's temporary is (it is one): a killed build's copy is
                # removed by a later write of the engine (kdtool.io.remove_left_behind).
                source = engine_path.with_name(engine_path.name + ".trt-input.tmp")
                onnx.save(model, str(source))
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        # 0: explicit batch (the only mode since 10); strongly typed is implied on 11, where
        # the STRONGLY_TYPED creation flag is deprecated and ignored.
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(source)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise KdtoolError(
                f"TensorRT cannot parse '{onnx_path}': "
                + "; ".join(errors[:3] or ["unknown error"])
            )
    finally:
        if source != onnx_path:
            source.unlink(missing_ok=True)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))

    inp = network.get_input(0)
    sample = tuple(inp.shape)[1:]
    shapes = None
    if any(d < 0 for d in inp.shape):  # a dynamic batch needs an optimisation profile
        shapes = profile.shapes(sample)
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(opt_profile)

    cache_path = timing_cache or default_timing_cache(trt.__version__, gpu)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    loaded = config.set_timing_cache(cache, False)
    if not loaded:
        config.set_timing_cache(config.create_timing_cache(b""), False)
    save_cache = keep_timing_cache(cache_path, timing_cache is not None, loaded, force)
    if not loaded:
        log(f"timing cache {cache_path} does not match this GPU/TensorRT: starting afresh"
            + ("" if save_cache else "; the file is left as it is (--force replaces it)"))

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise KdtoolError(
            f"TensorRT {trt.__version__} failed to build an engine from "
            f"'{onnx_path}' (its log above says why)"
        )
    engine_path.write_bytes(bytes(serialized))
    from kdtool.io import atomic_write_bytes

    if save_cache:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return {
        "tensorrt_version": trt.__version__,
        "gpu": gpu,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "precision": precision,
        "plan": asdict(plan),
        "profile": {k: list(v) for k, v in shapes.items()} if shapes else None,
        "input_shape": list(inp.shape),
        "workspace_bytes": int(workspace_gib * (1 << 30)),
        "timing_cache": str(cache_path),
        "build_seconds": round(seconds, 2),
        "onnx": onnx_path.name,
    }


def keep_timing_cache(path: Path, named_by_user: bool, loaded: bool, force: bool) -> bool:
    """Whether a build may write its timing cache to ``path``: kdtool's own default cache
    always; a file the user named (``--timing-cache``) only when it was a cache this build
    read, is new, or ``force``: a mistyped name must not overwrite someone's file."""
    return not named_by_user or loaded or force or not path.exists()


def sidecar_path(engine_path: Path) -> Path:
    """``ENGINE.json`` beside the engine: what built it, for what GPU, precision and batch."""
    return engine_path.with_name(engine_path.name + ".json")


def sidecar_text(record: dict) -> str:
    return json.dumps(record, indent=2, sort_keys=True) + "\n"
