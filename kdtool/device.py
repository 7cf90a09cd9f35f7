"""The device a run uses, and the arithmetic precision that goes with it."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from kdtool.errors import KdtoolError


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
