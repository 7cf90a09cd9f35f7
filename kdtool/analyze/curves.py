"""Learning curves of ``kdtool train`` and ``kdtool distill`` runs, from their checkpoints.

A run's output checkpoint carries its per-epoch history in its metadata, up to the epoch
of its weights: a distill output is rewritten after every epoch, a train output only when
validation improves (it keeps the best model). The run state beside it (``.state.pt``,
written every epoch) holds the whole history, so it is read when present and of the same
run. The same command thus plots finished runs and runs still going, several on shared
axes (Gaussian against dead leaves, one seed against another).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdtool.analyze import pyplot, save_png
from kdtool.errors import KdtoolError

HISTORY_STAGES = ("train", "distill")
# What curves are drawn against: runs of other batch sizes or speeds compare by images seen
# or by seconds of steps (validation excluded), both summed from each epoch's record.
X_AXES = {"epoch": "epoch", "images": "images seen",
          "seconds": "seconds of steps (validation excluded)"}


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[tuple[str, str, str], ...]  # (history key, line style, legend suffix)
    log: bool = False
    from_zero: bool = False  # a rate: a blip on a shared machine must not read as a collapse
    reference: str = ""  # a history key drawn as a level line (the teacher's own top-1)


# One table drives the plot: a panel is drawn when some run records one of its keys.
PANELS = (
    Panel("loss", (("loss", "-", ""),)),
    Panel("top-1 (%)", (
        ("val_top1", "-", "val"),
        ("val_top1_current", "-", "val, current BN"),
        ("val_top1_running", "--", "val, running BN"),
        ("val_top1_live", "-.", "val, live weights"),
        ("val_top1_current_live", "-.", "val, live weights"),
        ("train_top1", ":", "train"),
    ), reference="val_teacher_top1"),
    Panel("agreement with the teacher (%)", (
        ("agreement_current", "-", "val, current BN"),
        ("agreement_running", "--", "val, running BN"),
        ("noise_agreement", ":", "on noise"),
    )),
    Panel("learning rate", (("lr", "-", ""),), log=True),
    Panel("images/s", (("images_per_s", "-", ""),), from_zero=True),
)


@dataclass(frozen=True)
class Run:
    label: str
    file: str
    stage: str
    history: list[dict]
    epochs: int | None  # planned; None when the config does not say
    source: str = "checkpoint"  # or "run state": where the history was read


def load_run(path: Path, label: str, stage: str | None = None) -> Run:
    """The per-epoch history of the train or distill stage recorded in a checkpoint."""
    from kdtool.checkpoint import read_meta

    meta = read_meta(path)
    recorded = [name for name in meta.stages
                if name in HISTORY_STAGES and meta.stages[name].get("history")]
    if stage is not None and stage not in recorded:
        where = f"it records {', '.join(recorded)}" if recorded else "it records none"
        raise KdtoolError(f"'{path}' has no {stage} history ({where})",
                          "drop --stage, or pass a checkpoint written by kdtool " + stage)
    if not recorded:
        stages = ", ".join(meta.stages) or "none"
        raise KdtoolError(
            f"'{path}' records no per-epoch history (its stages: {stages})",
            "pass the output of kdtool train or kdtool distill (a calibrated checkpoint "
            "keeps the history of the run it was calibrated from)")
    name = stage or recorded[-1]
    record = meta.stages[name]
    config = record.get("config") or {}
    planned = config.get("epochs")
    history, source = list(record["history"]), "checkpoint"
    later = _state_history(Path(path), config, history)
    if later is not None:
        history, source = later, "run state"
    return Run(label, str(path), name, history, planned if isinstance(planned, int) else None,
               source)


def _state_history(path: Path, config: dict, history: list[dict]) -> list[dict] | None:
    """The longer history in the run state beside ``path``, if that state is this run's."""
    from kdtool import console
    from kdtool.runstate import RESUMABLE_CHANGES, load_state, state_path_for

    state_path = state_path_for(path)
    if not state_path.is_file():
        return None
    try:
        state = load_state(state_path)
    except KdtoolError as e:
        console.warn(f"{e.message}; drawing the history recorded in '{path}'")
        return None
    later = state.get("history")

    def what(c) -> dict:  # a resume may change where the run computes, not what
        return {k: v for k, v in (c or {}).items() if k not in RESUMABLE_CHANGES}

    if (what(state.get("config")) != what(config) or not isinstance(later, list)
            or later[:len(history)] != history or len(later) <= len(history)):
        return None  # another run's state (restarted with --force), or no newer epoch
    return later


def labels_for(paths: list[Path], labels: list[str] | None) -> list[str]:
    """``labels`` if given (one per file), else file stems, made unique by their folders."""
    if labels is not None:
        if len(labels) != len(paths):
            raise KdtoolError(f"--labels gives {len(labels)} names for {len(paths)} checkpoint(s)",
                              "give one label per checkpoint, comma-separated, in order")
        if not all(labels):
            raise KdtoolError(f"--labels '{','.join(labels)}' has an empty name",
                              "give one non-empty label per checkpoint, comma-separated")
        return labels
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [str(p.with_suffix("")) for p in paths]


def load_runs(paths: list[Path], labels: list[str] | None = None,
              stage: str | None = None) -> list[Run]:
    if not paths:
        raise KdtoolError("no checkpoint given", "kdtool analyze curves RUN.safetensors ...")
    return [load_run(p, label, stage) for p, label in
            zip(paths, labels_for(paths, labels), strict=True)]


def progress(run: Run) -> list[dict[str, float]]:
    """Per history row: its epoch, and the images and seconds of steps up to its end."""
    out, images, seconds = [], 0, 0.0
    for h in run.history:
        images += round(h.get("images_per_s", 0.0) * h.get("seconds", 0.0))
        seconds += h.get("seconds", 0.0)
        out.append({"epoch": h["epoch"], "images": images, "seconds": seconds})
    return out


def long_rows(runs: list[Run]) -> list[dict]:
    """One CSV row per run x epoch x recorded number: every metric, plotted or not."""
    rows = []
    for run in runs:
        for h, at in zip(run.history, progress(run), strict=True):
            for key, value in h.items():
                if key != "epoch" and type(value) in (int, float):  # not bool
                    rows.append({"run": run.label, "file": run.file, "stage": run.stage,
                                 **at, "metric": key, "value": float(value)})
    return rows


def series(run: Run, key: str, x: str = "epoch") -> tuple[list[float], list[float]]:
    """(x, values) of one metric; validation may run only every N epochs."""
    pts = [(at[x], float(h[key])) for h, at in zip(run.history, progress(run), strict=True)
           if key in h]
    return [a for a, _ in pts], [v for _, v in pts]


def panels_for(runs: list[Run]) -> list[Panel]:
    keys = {k for run in runs for h in run.history for k in h}
    return [p for p in PANELS if any(key in keys for key, _, _ in p.series)]


def _progress(run: Run) -> str:
    return f"{run.history[-1]['epoch']}/{run.epochs or '?'}"


def summary(run: Run) -> dict:
    """The figures a table row shows: where the run is, its last loss, its best validation."""
    last, at = run.history[-1], progress(run)[-1]
    out = {"run": run.label, "file": run.file, "stage": run.stage, "source": run.source,
           "epoch": last["epoch"], "epochs": run.epochs, "images": at["images"],
           "seconds": at["seconds"], "loss": last["loss"]}
    for key in ("val_top1", "val_top1_current"):
        epochs, values = series(run, key)
        if values:
            i = max(range(len(values)), key=values.__getitem__)
            out |= {"val_metric": key, "val_last": values[-1], "val_best": values[i],
                    "val_best_epoch": epochs[i]}
            break
    return out


def write_png(path: Path, runs: list[Run], title: str | None = None,
              x: str = "epoch") -> None:
    """One panel per quantity; colour tells the runs apart, line style the series."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    panels = panels_for(runs)
    cols = min(3, len(panels) + 1)  # a free cell takes the runs' legend
    rows_n = -(-(len(panels) + 1) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.6 * rows_n), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {run.label: colours[i % len(colours)] for i, run in enumerate(runs)}
    # and a marker each, so that runs tell apart in greyscale too
    marker = {run.label: "osD^v<>p"[i % 8] for i, run in enumerate(runs)}
    for ax, panel in zip(axes.flat, panels, strict=False):
        drawn = {}  # line style -> what it shows, for this panel's own legend
        for run in runs:
            for key, style, suffix in panel.series:
                xs, ys = series(run, key, x)
                if not xs:
                    continue
                ax.plot(xs, ys, linestyle=style, marker=marker[run.label], markersize=3,
                        markevery=max(1, len(xs) // 8), color=colour[run.label])
                drawn.setdefault(style, suffix)
            level = next((row[panel.reference] for row in reversed(run.history)
                          if panel.reference and panel.reference in row), None)
            if level is not None:
                ax.axhline(level, color=colour[run.label], linestyle=(0, (1, 3)), linewidth=1)
                drawn.setdefault((0, (1, 3)), "teacher")
        ax.set_title(panel.title)
        if panel.from_zero:
            ax.set_ylim(bottom=0)
        ax.set_xlabel(X_AXES[x])
        if x == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if any(drawn.values()):
            ax.legend([Line2D([], [], color="0.3", linestyle=st) for st in drawn],
                      list(drawn.values()), fontsize=8)
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.axis("off")
    spare[0].legend([Line2D([], [], color=colour[run.label], marker=marker[run.label],
                            linewidth=2) for run in runs],
                    [f"{run.label} ({run.stage}, epoch {_progress(run)})" for run in runs],
                    loc="center", fontsize=9, title="runs")
    stages = sorted({run.stage for run in runs})
    fig.suptitle(title or f"kdtool {' / '.join(stages)}: learning curves")
    save_png(fig, path)
