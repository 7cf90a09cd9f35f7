"""The device a run uses, and the arithmetic precision that goes with it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from kdtool import console
from kdtool.errors import KdtoolError, check_choice, check_threads
from kdtool.runinfo import usable_cores

# torch.compile modes. The two marked with CUDA graphs replay each step as one graph: no CPU
# cost per kernel launch, which bounds a step made of hundreds of small kernels.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise KdtoolError(f"unknown device '{name}'", "use auto, cpu, cuda or cuda:N") from e
    if device.type not in ("cpu", "cuda"):  # kdtool's precision and memory paths know these
        raise KdtoolError(f"device '{name}' is not supported", "use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdtoolError(f"device '{name}' asked for but no CUDA GPU is available",
                          "use --device cpu")
    if device.type == "cuda" and device.index is not None and \
            device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise KdtoolError(f"device '{name}' asked for but this machine has {n} CUDA GPU"
                          f"{'s' * (n != 1)}", f"use cuda:0 to cuda:{n - 1}")
    return device


def device_label(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H100 80GB HBM3)``: what a run's provenance records."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


# The arithmetic of a training step. auto: bf16 on CUDA (tensor cores), fp32 on a CPU.
PRECISIONS = ("auto", "fp32", "bf16")
_BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX, Arm BF16


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's CPU threads while a command runs (--threads; None or 0: one per core), then
    the number before: commands run in one process in tests and scripts."""
    if not check_threads(threads):
        yield
        return
    cores = usable_cores()
    if threads > cores:
        console.warn(f"--threads {threads} is more than the {cores} cores this process may "
                     "use: the threads take turns, which is slower than one per core")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 dot products in hardware (Linux: /proc/cpuinfo)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return bool(_BF16_CPU_FLAGS & set(line.partition(":")[2].split()))
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for ``--precision name`` on ``device``."""
    check_choice(name, PRECISIONS, "--precision")
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        from kdtool import console

        console.warn("--precision bf16: this CPU has no bf16 instructions (AVX512-BF16, AMX "
                     "or Arm BF16), so bf16 is emulated and likely slower than fp32")
    return name


def autocast_for(device: torch.device, precision: str | None = None):
    """bf16 autocast for a resolved ``precision`` ("bf16"/"fp32"; None: bf16 on CUDA only)."""
    if precision is None:
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def memory_format_for(channels_last: bool) -> torch.memory_format | None:
    """The layout of a run's models and batches: NHWC (``--channels-last``, the default) or
    PyTorch's NCHW. NHWC is where cuDNN's tensor-core and oneDNN's bf16 kernels run fastest,
    and on a 2-core x86 CPU fp32 steps ran 1.00-1.36x faster in it too
    (bench/cpu_step_layout.py, docs/BENCHMARKS.md)."""
    return torch.channels_last if channels_last else None


def compile_step(fn, mode: str = "default", device: torch.device | None = None):
    """``torch.compile(fn)`` in ``mode`` (one of COMPILE_MODES; CUDA graphs apply on CUDA)."""
    check_choice(mode, COMPILE_MODES, "--compile-mode")
    if device is not None and device.type != "cuda" and mode in CUDA_GRAPH_MODES:
        from kdtool import console

        console.warn(f"--compile-mode {mode}: CUDA graphs need a CUDA device; on {device.type} "
                     "it compiles like --compile-mode default"
                     + (" with kernel tuning" if mode == "max-autotune" else ""))
    return torch.compile(fn, mode=None if mode == "default" else mode)


def begin_step(mode: str | None) -> None:
    """Mark a new training step for CUDA-graph modes, so that replaying this step's graphs
    may reuse the memory of the previous step's outputs (they are no longer read)."""
    if mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()
