"""Resumable run state (model, optimiser, scheduler, progress), written every epoch.

Saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``,
which accepts only tensors and plain containers: a state file, too, is never
unpickled.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from kdtool.errors import KdtoolError
from kdtool.io import atomic_write_bytes


def state_path_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".state.pt")


def save_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise KdtoolError(f"no run state to resume at '{path}'",
                          "start without --resume (the state file is written after each epoch)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, refused global, ...
        raise KdtoolError(f"run state '{path}' is unreadable: {str(e).splitlines()[0]}",
                          "start over with --force") from e


def check_same_config(saved: dict[str, Any], current: dict[str, Any], path: Path,
                      ignore: tuple[str, ...] = ("device",)) -> None:
    """A resumed run must be the same run: refuse when a setting changed."""
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        if saved.get(key) != current.get(key):
            raise KdtoolError(
                f"cannot resume '{path}': {key} was {saved.get(key)!r}, now {current.get(key)!r}",
                "resume with the same options, or start over with --force",
            )
