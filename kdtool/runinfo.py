"""Provenance: who made a file, how, and with what result."""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import sys
from typing import Any

_command_line: list[str] | None = None


def usable_cores() -> int:
    """The CPU cores this process may use (Linux: its affinity, as a container's limit
    sets it), else the machine's."""
    import os

    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def set_command_line(args: list[str]) -> None:
    """Record the CLI arguments (the CLI may be called with an explicit argv, as in tests)."""
    global _command_line
    _command_line = list(args)


def provenance(seed: int | None = None, metrics: dict | None = None, **extra) -> dict[str, Any]:
    import kdtool

    args = _command_line if _command_line is not None else sys.argv[1:]
    return {
        "kdtool_version": kdtool.__version__,
        "torch_version": _torch_version(),
        "python": platform.python_version(),
        "command": shlex.join(["kdtool", *args]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "metrics": metrics or {},
        **extra,
    }


def _torch_version() -> str:
    """torch's version without importing it (2 s) where a command has not: bench and
    eval of ONNX files record it but never run torch."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "not installed"


def run_rate(history: list[dict]) -> dict[str, float]:
    """A run's ``seconds`` (its epochs' step time, summed) and ``images_per_s`` (all images
    over that time): one epoch's figures, or a mean of rates, misstate a run whose speed
    changed (a busy machine, a resumed run on another device)."""
    seconds = sum(row["seconds"] for row in history)
    images = sum(row["images_per_s"] * row["seconds"] for row in history)
    return {"seconds": seconds, "images_per_s": images / seconds if seconds > 0 else 0.0}
