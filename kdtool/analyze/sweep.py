"""Distillation sweeps: the paper's Table 1 (share of teacher BN layers on running
statistics) and Fig. 3b (distillation batch size), at a scale the user chooses.

Every point is one ``kdtool distill`` run per seed (the same seeds and number of noise
images at every point), whose student is evaluated on ``--val`` on current and on running
statistics. One run is one draw: on digits, students of two seeds differ by a few points,
as much as neighbouring points do, so a curve worth reading averages several seeds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kdtool import console
from kdtool.analyze import pyplot, save_png
from kdtool.distill.loop import DistillConfig, DistillRun
from kdtool.errors import KdtoolError, check_choice
from kdtool.runstate import state_path_for

PARAMS = {
    "running-fraction": "share of the teacher's BN layers on running statistics",
    "batch-size": "distillation batch size",
}
# The points of the appendix's Table 1 and Fig. 3b.
DEFAULT_VALUES = {"running-fraction": "0,0.25,0.5,0.75,1", "batch-size": "16,32,64,128,256"}


KEEP = ("images", "steps")  # what a batch-size sweep holds constant


def point_config(base: DistillConfig, param: str, value: float,
                 keep: str = "images") -> DistillConfig:
    check_choice(keep, KEEP, "--keep")
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
    if keep == "steps":  # same optimiser steps: a larger batch sees more noise
        return replace(base, batch_size=b)
    iters = max(1, round(base.iters_per_epoch * base.batch_size / b))
    return replace(base, batch_size=b, iters_per_epoch=iters)


def _require_batchnorm(teacher: str) -> None:
    """Both sweeps vary how the teacher's BatchNorm layers normalise noise; distill's own
    message would offer options a sweep does not have (--teacher-norm-align, dropping
    --teacher-bn)."""
    from kdtool.bn import bn_layers
    from kdtool.checkpoint import load_checkpoint

    model, meta = load_checkpoint(teacher)
    if not bn_layers(model):
        raise KdtoolError(
            f"teacher '{teacher}' ({meta.arch}) has no BatchNorm layers, and both sweeps vary "
            "how a teacher's BatchNorm normalises noise: the share of its layers on running "
            "statistics, or the batch whose statistics it uses",
            "sweep a teacher with BatchNorm layers (a per-sample-normalised teacher distils "
            "with 'kdtool distill --teacher-norm-align')")


def point_path(workdir: Path, param: str, value: float, seed: int) -> Path:
    return Path(workdir) / f"{param}_{value:g}_seed{seed}.safetensors"


def clear_other_points(workdir: Path, param: str, keep: list[Path]) -> None:
    """--force starts the sweep over: the points of an earlier sweep of ``param`` at other
    values go too (files this command wrote in its own folder), or a later --resume of a
    wider sweep would meet them with their old settings and refuse."""
    if not workdir.is_dir():
        return
    for path in sorted(workdir.glob(f"{param}_*.safetensors")):
        if path not in keep:
            path.unlink()
            state_path_for(path).unlink(missing_ok=True)
            console.info(f"removed {path}, a point of an earlier sweep (--force)")


def run_sweep(base: DistillConfig, param: str, values: list[float], workdir: Path,
              keep: str = "images", force: bool = False, resume: bool = False,
              seeds: int = 1) -> list[dict]:
    """One distillation per value and seed (``base.seed``, ``base.seed + 1``, ...: ``seeds``
    of them); ``resume``: runs whose run state is in ``workdir`` continue from it (a finished
    one is read back, not run again), the others start. One row per run."""
    check_choice(param, list(PARAMS), "sweep parameter")
    if not base.val:
        raise KdtoolError("a sweep measures accuracy and needs labelled --val data")
    if seeds < 1:
        raise KdtoolError(f"--seeds {seeds} runs nothing", "pass --seeds 1 or more")
    _require_batchnorm(base.teacher)
    runs = [(v, base.seed + i, replace(point_config(base, param, v, keep), seed=base.seed + i))
            for v in values for i in range(seeds)]  # every value checked before any work
    paths = [point_path(workdir, param, v, seed) for v, seed, _ in runs]
    if not (force or resume):
        for path in paths:
            if path.exists() or state_path_for(path).exists():
                raise KdtoolError(f"'{path}' exists from an earlier sweep",
                                  "pass --resume to continue that sweep (finished points are "
                                  "kept) or --force to start over")
    if force:
        clear_other_points(Path(workdir), param, paths)
    rows = []
    for (value, seed, cfg), path in zip(runs, paths, strict=True):
        cont = resume and state_path_for(path).exists()
        # force: without a state the file is this sweep's own, cut off before its state
        r = DistillRun(replace(cfg, val_every=cfg.epochs), path, force=not cont,
                       resume=cont).run()
        rows.append({"param": param, "value": value, "seed": seed, "teacher_bn": cfg.teacher_bn,
                     "batch_size": cfg.batch_size, "iters": cfg.epochs * cfg.iters_per_epoch,
                     "val_top1_current": r["val_top1_current"],
                     "val_top1_running": r["val_top1_running"],
                     "val_teacher_top1": r["val_teacher_top1"], "val_images": r["val_images"],
                     # distillation time over all its epochs, also those run before a resume
                     "seconds": sum(h["seconds"] for h in r["history"])})
    return rows


MODES = (("val_top1_current", "student evaluated on current BN", "o-"),
         ("val_top1_running", "student evaluated on its running BN", "s--"))


def summarise(rows: list[dict]) -> list[dict]:
    """One row per point: each BN mode's mean, min and max over its seeds, in value order."""
    points: dict[float, list[dict]] = {}
    for r in rows:
        points.setdefault(r["value"], []).append(r)
    out = []
    for value, runs in points.items():
        p = {"value": value, "seeds": len(runs),
             "seconds": sum(r["seconds"] for r in runs)}
        for key, _, _ in MODES:
            scores = [r[key] for r in runs]
            p[key] = sum(scores) / len(scores)
            p[key + "_min"], p[key + "_max"] = min(scores), max(scores)
        out.append(p)
    return out


def write_png(path: Path, rows: list[dict], title: str, val: str) -> None:
    """Each BN mode's mean over seeds, its min-max band when there are several seeds, and
    the teacher's own accuracy: the ceiling the students are read against."""
    from matplotlib.ticker import NullLocator

    plt = pyplot()

    points = summarise(rows)
    seeds = max(p["seeds"] for p in points)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    xs = [p["value"] for p in points]
    for key, label, style in MODES:
        line, = ax.plot(xs, [p[key] for p in points], style,
                        label=label + (f", mean of {seeds} seeds" if seeds > 1 else ""))
        if seeds > 1:
            ax.fill_between(xs, [p[key + "_min"] for p in points],
                            [p[key + "_max"] for p in points], color=line.get_color(),
                            alpha=0.15, linewidth=0)
    teacher = rows[0]["val_teacher_top1"]
    ax.axhline(teacher, color="grey", linestyle=":", label=f"teacher ({teacher:.1f}%)")
    param = rows[0]["param"]
    if param == "batch-size":
        ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])  # the points run, as numbers
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(PARAMS[param])
    ax.set_ylabel(f"top-1 % on {val} ({rows[0]['val_images']:,} images)")
    spread = (f"bands: min to max of {seeds} seeds" if seeds > 1 else
              "one seed: a point can move by several points with another (--seeds N)")
    ax.set_title(f"{title}\n{spread}", fontsize=10)
    ax.grid(alpha=0.3)
    # Below the axes: inside, it covered the teacher's line or a curve, whichever was empty.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=8,
              frameon=False)
    save_png(fig, path)
