"""Accuracy against the number of calibration batches (the appendix's Figure 3a).

For each point the student's BN statistics are recomputed from ``n`` batches
(same seed: the images of a smaller ``n`` are a prefix of a larger one's) and
the student is evaluated on running statistics.  The input student's own
accuracies (its own, noise, running statistics; current statistics at batch
256) are the reference lines.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch.nn as nn

from kdtool import console
from kdtool.calibrate.recompute import recompute_bn_stats
from kdtool.data import ImageData
from kdtool.errors import KdtoolError
from kdtool.evaluate import evaluate
from kdtool.io import atomic_path

CSV_COLUMNS = ("kind", "batches", "batch_size", "images", "seed", "top1")


def parse_points(text: str) -> list[int]:
    from kdtool.cli.options import parse_list

    points = parse_list(text, "--sweep", int, "1,2,4,8,16,32,64", "batch counts")
    if min(points) < 1:
        raise KdtoolError(
            f"--sweep '{text}' needs batch counts >= 1", "e.g. --sweep 1,2,4,8,16,32,64"
        )
    return sorted(set(points))


def run_sweep(
    model: nn.Module,
    data: ImageData,
    val: ImageData,
    mean,
    std,
    points: list[int],
    batch_size: int,
    seed: int,
    repeats: int,
    device,
) -> list[dict]:
    """One row per (point, repeat): calibrated top-1 on ``val`` (running statistics)."""
    work = copy.deepcopy(model)  # recomputing resets the statistics: the input is irrelevant
    rows = []
    with console.progress_task("sweep", len(points) * repeats, unit="point") as advance:
        for n in points:
            for r in range(repeats):
                recompute_bn_stats(
                    work, data, mean, std, n, batch_size, seed + r, device, progress=False
                )
                top1 = evaluate(work, val, mean, std, batch_size=256, device=device)["top1"]
                rows.append(
                    {
                        "kind": "calibrated",
                        "batches": n,
                        "batch_size": batch_size,
                        "images": n * batch_size,
                        "seed": seed + r,
                        "top1": top1,
                    }
                )
                advance(1, info=f"{n} batches: {top1:.2f}%")
    return rows


def reference_rows(running: float, current: float) -> list[dict]:
    return [
        {
            "kind": "input_running_stats",
            "batches": "",
            "batch_size": "",
            "images": "",
            "seed": "",
            "top1": running,
        },
        {
            "kind": "input_current_stats_batch256",
            "batches": "",
            "batch_size": 256,
            "images": "",
            "seed": "",
            "top1": current,
        },
    ]


def write_csv(path: Path, rows: list[dict]) -> None:
    from kdtool.analyze import write_csv as write_rows

    write_rows(path, rows, CSV_COLUMNS)


def write_png(path: Path, rows: list[dict], title: str, noise: bool = True) -> None:
    # The object-oriented API with an Agg canvas: no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cal = [r for r in rows if r["kind"] == "calibrated"]
    points = sorted({r["batches"] for r in cal})
    by_point = {n: [r["top1"] for r in cal if r["batches"] == n] for n in points}
    means = [statistics.fmean(by_point[n]) for n in points]
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if any(len(v) > 1 for v in by_point.values()):
        # The range the seeds measured, not a standard deviation: from 2 or 3 seeds an sd
        # is itself noise, and its bar can reach past every value measured.
        low = [m - min(by_point[n]) for n, m in zip(points, means, strict=True)]
        high = [max(by_point[n]) - m for n, m in zip(points, means, strict=True)]
        ax.errorbar(
            points,
            means,
            yerr=[low, high],
            marker="o",
            capsize=3,
            label=f"calibrated (mean, min to max of {len(by_point[points[0]])} seeds)",
        )
    else:
        ax.plot(points, means, marker="o", label="calibrated (running statistics)")
    styles = {
        "input_current_stats_batch256": ("current statistics, batch 256", "--"),
        "input_running_stats": (
            "noise running statistics" if noise else "input running statistics",
            ":",
        ),
    }
    for r in rows:
        if r["kind"] in styles:
            label, style = styles[r["kind"]]
            ax.axhline(
                r["top1"],
                linestyle=style,
                color="grey" if style == ":" else "black",
                label=f"{label} ({r['top1']:.1f}%)",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(points, [str(n) for n in points])
    ax.set_xlabel(f"calibration batches (batch size {cal[0]['batch_size']})")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
