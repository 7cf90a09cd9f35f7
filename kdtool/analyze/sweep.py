"""Distillation sweeps: the paper's Table 1 (share of teacher BN layers on running
statistics) and Fig. 3b (distillation batch size), at a scale the user chooses.

Every point is one ``kdtool distill`` run (same seed, same number of noise images), whose
student is evaluated on ``--val`` on current and on running statistics.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from kdtool.analyze import pyplot, save_png
from kdtool.distill.loop import DistillConfig, DistillRun
from kdtool.errors import KdtoolError, check_choice

PARAMS = {
    "running-fraction": "share of the teacher's BN layers on running statistics",
    "batch-size": "distillation batch size",
}


KEEP = ("images", "steps")  # what a batch-size sweep holds constant


def point_config(base: DistillConfig, param: str, value: float,
                 keep: str = "images") -> DistillConfig:
    if param == "running-fraction":
        if not 0 <= value <= 1:
            raise KdtoolError(f"running fraction {value} is not between 0 and 1")
        if value == 0:
            return replace(base, teacher_bn="current", running_fraction=None)
        if value == 1:
            return replace(base, teacher_bn="running", running_fraction=None)
        return replace(base, teacher_bn="mixed", running_fraction=value)
    b = int(value)
    if b != value or b < 2:
        raise KdtoolError(f"batch size {value} must be an integer >= 2")
    check_choice(keep, KEEP, "--keep")
    if keep == "steps":  # same optimiser steps: a larger batch sees more noise
        return replace(base, batch_size=b)
    iters = max(1, round(base.iters_per_epoch * base.batch_size / b))
    return replace(base, batch_size=b, iters_per_epoch=iters)


def run_sweep(base: DistillConfig, param: str, values: list[float], workdir: Path,
              keep: str = "images") -> list[dict]:
    check_choice(param, list(PARAMS), "sweep parameter")
    if not base.val:
        raise KdtoolError("a sweep measures accuracy and needs labelled --val data")
    configs = [point_config(base, param, v, keep) for v in values]  # check every value first
    rows = []
    for value, cfg in zip(values, configs, strict=True):
        t0 = time.perf_counter()
        r = DistillRun(replace(cfg, val_every=cfg.epochs),
                       workdir / f"{param}_{value:g}.safetensors", force=True).run()
        rows.append({"param": param, "value": value, "teacher_bn": cfg.teacher_bn,
                     "batch_size": cfg.batch_size, "iters": cfg.epochs * cfg.iters_per_epoch,
                     "val_top1_current": r["val_top1_current"],
                     "val_top1_running": r["val_top1_running"],
                     "seconds": time.perf_counter() - t0})
    return rows


def write_png(path: Path, rows: list[dict], title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["value"] for r in rows]
    ax.plot(xs, [r["val_top1_current"] for r in rows], "o-", label="student, current BN")
    ax.plot(xs, [r["val_top1_running"] for r in rows], "s--", label="student, running BN")
    param = rows[0]["param"]
    if param == "batch-size":
        ax.set_xscale("log", base=2)
    ax.set_xlabel(PARAMS[param])
    ax.set_ylabel("top-1 %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)
