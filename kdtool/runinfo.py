"""Provenance: who made a file, how, and with what result."""

from __future__ import annotations

import datetime as _dt
import functools
import platform
import shlex
import sys
from pathlib import Path
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


def provenance(seed: int | None = None, metrics: dict | None = None,
               device: str | None = None, precision: str | None = None,
               **extra) -> dict[str, Any]:
    """What made a file: versions (and the commit of a source checkout), the command, the
    seed, and the machine and settings a rerun needs to give the same bits: float results
    depend on the CPU, the thread count and the device as well as the seed."""
    import kdtool

    args = _command_line if _command_line is not None else sys.argv[1:]
    commit = code_commit()
    return {
        "kdtool_version": kdtool.__version__,
        **({"kdtool_commit": commit} if commit else {}),
        "torch_version": _torch_version(),
        "python": platform.python_version(),
        "command": shlex.join(["kdtool", *args]),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "machine": _machine(device, precision),
        "metrics": metrics or {},
        **extra,
    }


def package_versions(*names: str) -> dict[str, str]:
    """The installed versions of ``names`` (distribution names), leaving out the absent."""
    from importlib import metadata

    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _machine(device: str | None, precision: str | None) -> dict[str, Any]:
    machine: dict[str, Any] = {"cpu": cpu_name(), "usable_cpus": usable_cores(),
                               "platform": platform.platform()}
    if "torch" in sys.modules:  # the threads this run computed with (never imported for it)
        machine["torch_threads"] = sys.modules["torch"].get_num_threads()
    if device is not None:
        machine["device"] = device
    if precision is not None:
        machine["precision"] = precision
    return machine


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.cache
def code_commit() -> str | None:
    """``<commit>`` (``-dirty`` with uncommitted changes) when kdtool runs from a git
    checkout, whose version number alone does not say which code ran; None for an install."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        def git(*args: str) -> str:
            # no optional locks: git status would otherwise take the index lock, and a
            # user's own git command in that checkout could fail on it
            return subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args],
                                  capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git, or not a repository after all
        return None
    return f"{commit}-dirty" if dirty else commit or None


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
