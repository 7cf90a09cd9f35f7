"""The device a run uses, and the arithmetic precision that goes with it."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from kdtool.errors import KdtoolError, check_choice

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
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdtoolError(f"device '{name}' asked for but no CUDA GPU is available",
                          "use --device cpu")
    return device


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (tensor cores), nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def compile_step(fn, mode: str = "default"):
    """``torch.compile(fn)`` in ``mode`` (one of COMPILE_MODES; CUDA graphs apply on CUDA)."""
    check_choice(mode, COMPILE_MODES, "--compile-mode")
    return torch.compile(fn, mode=None if mode == "default" else mode)


def begin_step(mode: str | None) -> None:
    """Mark a new training step for CUDA-graph modes, so that replaying this step's graphs
    may reuse the memory of the previous step's outputs (they are no longer read)."""
    if mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()
