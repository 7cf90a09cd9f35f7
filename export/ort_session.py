"""Open an ONNX Runtime session the one way every kdtool stage does (export, bench, serve).

``open_session`` checks the file and the providers, refuses a silent provider fallback,
and on the CPU provider re-encodes an INT8 graph's int8 activations as uint8, and its
weights too where this CPU's int8-weight kernels are wrong (``kdtool.export.cpu_int8``:
the same values, run by ONNX Runtime's fast kernels). The file on disk is never changed:
it stays the TensorRT-valid symmetric graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdtool.errors import KdtoolError, check_choice, message_line
from kdtool.export.formats import GPU_EXTRA_HINT
from kdtool.io import require_file

# The one table of ONNX Runtime targets: serve --provider T, bench and predict --backend
# ort-T. Providers in priority order; CPU is never appended to a GPU list, where ORT would
# silently run the whole graph when the GPU provider fails to load.
ORT_TARGETS: dict[str, tuple[str, ...]] = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider",),
    # Nodes TensorRT cannot take run on CUDA; the check is that TensorRT leads.
    "trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider"),
}
# ONNX Runtime's own name for the provider, accepted wherever a target is (serve took it).
TARGET_ALIASES = {"tensorrt": "trt"}
# Short labels of providers (bench tables); their lower case names one in open_session.
PROVIDER_LABELS = {
    "CPUExecutionProvider": "CPU",
    "CUDAExecutionProvider": "CUDA",
    "TensorrtExecutionProvider": "TRT",
    "OpenVINOExecutionProvider": "OpenVINO",
    "CoreMLExecutionProvider": "CoreML",
}
PROVIDER_ALIASES = {label.lower(): name for name, label in PROVIDER_LABELS.items()} | {
    alias: ORT_TARGETS[target][0] for alias, target in TARGET_ALIASES.items()}


def ort_target(name: str) -> str:
    """``name`` as a key of ORT_TARGETS, in any case (an alias becomes its target), else
    'did you mean'."""
    name = name.lower()
    return check_choice(TARGET_ALIASES.get(name, name), ORT_TARGETS, "ONNX Runtime provider")
LOAD_HINT = "pass an .onnx file written by kdtool export"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def load_hint(path: str | Path) -> str:
    """What to do with a file that is not a loadable ONNX model."""
    path = Path(path)
    onnx = path.with_suffix(".onnx")
    if path.suffix.lower() == ".safetensors":
        # The usual slip: handing the PyTorch checkpoint to an ONNX consumer.
        return (f"'{path.name}' looks like a PyTorch checkpoint; export it first: kdtool export "
                f"{path} --onnx {onnx}")
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:  # a plain state_dict: export needs more
        kd = path.with_suffix(".safetensors")
        return (f"'{path.name}' looks like a plain PyTorch state_dict; make it a kdtool "
                f"checkpoint, then export it: kdtool convert {path} --arch ARCH --out {kd}, "
                f"then kdtool export {kd} --onnx {onnx}")
    return LOAD_HINT


MEMORY_ARENA_HELP = (
    "ONNX Runtime's CPU memory arena (its default) keeps the memory of the largest call "
    "for the next. Off, a call's memory goes back when it ends (held after a batch of 64 x 3 "
    "x 256 x 256 through a conv: 88 MB instead of 616), but large activations cost more "
    "time (2.6x there; 0-6% for CIFAR ResNets): docs/BENCHMARKS.md."
)


@dataclass
class OrtSession:
    """A loaded session, the providers it really runs on, and what was done to the graph."""

    session: Any
    providers: list[str]
    uint8_tensors: int = 0  # int8 activation tensors re-encoded as uint8 for the CPU
    uint8_weights: int = 0  # int8 weights re-encoded as uint8 (CPUs whose int8 kernels err)
    memory_arena: bool = True

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"providers": self.providers}
        if not self.memory_arena:
            d["memory_arena"] = "off"
        if self.uint8_tensors:
            d["int8_activations"] = (
                f"{self.uint8_tensors} tensors run as uint8 on the CPU provider (same values)"
            )
        if self.uint8_weights:
            d["int8_weights"] = (
                f"{self.uint8_weights} weights run as uint8 (same values): this CPU's "
                "int8-weight kernels overflow (x86 without VNNI)"
            )
        return d


def open_session(
    path: str | Path,
    providers: tuple[str, ...] | list[str] = ("cpu",),
    *,
    threads: int | None = None,
    inter_op_threads: int | None = None,
    spinning: bool = True,
    uint8_on_cpu: bool = True,
    memory_arena: bool = True,
) -> OrtSession:
    """Open ``path`` on ``providers`` (aliases or full names, in priority order).

    ``threads``: intra-op threads (None or 0: one per core). ``spinning=False`` stops idle
    ORT threads from spinning (a server's event loop needs those cores). ``uint8_on_cpu``:
    see the module docstring. ``memory_arena=False``: no CPU memory arena, which otherwise
    keeps the most a call ever needed, and more (it grows by doubling). KdtoolError for a
    missing or unloadable file, a provider this onnxruntime lacks, or one it did not activate.
    """
    import onnxruntime as ort

    path = require_file(path, "ONNX model", load_hint(path))
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in providers]
    available = ort.get_available_providers()
    for p in names:
        if p not in available:
            raise KdtoolError(
                f"ONNX Runtime {ort.__version__} has no {p} (available: {', '.join(available)})",
                GPU_EXTRA_HINT if p != "CPUExecutionProvider" else None,
            )
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a fallback is checked below, not logged
    if threads:
        options.intra_op_num_threads = threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = memory_arena
    source: str | bytes = str(path)
    counts = (0, 0)
    if uint8_on_cpu and names[0] == "CPUExecutionProvider":
        source, counts = _cpu_graph(path)
    try:
        session = ort.InferenceSession(source, options, providers=names)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types
        reason = message_line(e) or type(e).__name__
        raise KdtoolError(f"ONNX Runtime cannot load '{path}': {reason}", load_hint(path)) from e
    # A provider whose libraries fail to load is dropped with only a log line: refuse it.
    active = session.get_providers()
    inactive = [p for p in names if p not in active]
    if inactive:
        raise KdtoolError(
            f"ONNX Runtime did not activate {inactive[0]} for '{path}' (active: "
            f"{', '.join(active)}); it would run on {active[0]} instead",
            "check that the CUDA, cuDNN and TensorRT libraries match onnxruntime-gpu",
        )
    return OrtSession(session, active, *counts, memory_arena=memory_arena)


def _cpu_graph(path: Path) -> tuple[str | bytes, tuple[int, int]]:
    """The file itself, or its serialized uint8 re-encoding when it is an INT8 graph; and
    the counts of re-encoded activation tensors and weights."""
    import onnx

    from kdtool.export.cpu_int8 import (
        int8_activations_to_uint8,
        int8_weights_exact,
        int8_weights_to_uint8,
    )

    try:  # weights kept on disk are not read: a float model only needs its node list
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not parseable here: let ONNX Runtime report it in its own words
        return str(path), (0, 0)
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return str(path), (0, 0)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return str(path), (0, 0)  # bytes cannot carry external weights; INT8 files are small
    counts = (int8_activations_to_uint8(model),
              0 if int8_weights_exact() else int8_weights_to_uint8(model))
    return (model.SerializeToString(), counts) if any(counts) else (str(path), (0, 0))
