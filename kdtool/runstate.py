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


class RunCheckpoint:
    """The output and resumable state of one long run (``train``, ``distill``).

    Protects existing files (no overwrite without ``force``), restores model,
    optimiser, scheduler and progress on ``resume`` and saves them after every
    epoch, so a killed run loses at most the epoch in flight.
    """

    def __init__(self, out: str | Path, force: bool, resume: bool, writer: bool = True):
        from kdtool.io import check_output

        self.out = Path(out)
        self.path = state_path_for(self.out)
        self.resume = resume
        self.writer = writer  # in a multi-process run only rank 0 checks and writes files
        if not resume and writer:
            check_output(self.out, force, "output")
            if self.path.exists() and not force:
                raise KdtoolError(f"a run state '{self.path}' exists from an earlier run",
                                  "pass --resume to continue it or --force to start over")

    def restore(self, config: dict, model, opt, sched) -> tuple[int, float, list[dict]]:
        """(first epoch to run, best metric, history): from the state when resuming."""
        if not self.resume:
            return 0, float("-inf"), []
        state = load_state(self.path)
        check_same_config(state["config"], config, self.path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        return state["epoch"] + 1, state["best"], state["history"]

    def save(self, config: dict, epoch: int, best: float, history: list[dict], model, opt,
             sched) -> None:
        if not self.writer:
            return
        save_state(self.path, {
            "config": config, "epoch": epoch, "best": best, "history": history,
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict()})
