"""``kdtool bench`` results as a rich table, a Markdown report and a latency/throughput plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape

from kdtool.errors import KdtoolError
from kdtool.export.ort_session import PROVIDER_LABELS
from kdtool.io import atomic_path, atomic_write_text

COLUMNS = [
    "model",
    "backend",
    "runs on",
    "batch",
    "status",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "calls",
    "img/s",
    "peak MB",
    "size MB",
    "top-1 %",
]
PLOT_FORMATS = ("png", "svg", "pdf")
# The terminal table leaves out the model (one table per model), its size and p90.
TERMINAL = [
    "backend",
    "runs on",
    "batch",
    "p50 ms",
    "p99 ms",
    "img/s",
    "peak MB",
    "top-1 %",
    "status",
]
_HEADER = {
    "runs on": "on",
    "p50 ms": "p50 ms",
    "p99 ms": "p99 ms",
    "peak MB": "MB",
    "top-1 %": "top-1",
}  # short headers: the table fits 80 columns


def runs_on(row: dict) -> str:
    """The providers an ONNX Runtime session actually uses, else the device or runtime,
    named one way in the column: a torch row's device "cpu" / "cuda:1" reads as ONNX
    Runtime's CPU / CUDA do (the JSON keeps torch's own name)."""
    if row["providers"]:
        return "+".join(PROVIDER_LABELS.get(p, p) for p in row["providers"])
    if row["device"] is None:  # it did not run
        return ""
    return "TensorRT" if row["backend"] == "trt" else row["device"].upper()


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 10**digits else f"{v:.{digits}g}"


def _memory(row: dict) -> str:
    parts = []
    if row["peak_rss_mb"] is not None:
        parts.append(f"{row['peak_rss_mb']:.1f}")
    if row["gpu_mem_mb"] is not None:
        parts.append(f"GPU {row['gpu_mem_mb']:.1f}")
    return " / ".join(parts) or "-"


def _accuracy(row: dict) -> str:
    acc = row["accuracy"]
    if acc is None:
        return "-"
    drop = acc.get("drop")
    return f"{acc['top1']:.2f}" + (f" ({-drop:+.2f})" if drop else "")


# A cell whose mean latency is this many times its median: img/s (from the mean) and p50
# tell different stories, as when other work takes the cores for some calls.
UNSTABLE_MEAN_OVER_P50 = 1.5


def runtime_note(row: dict) -> str | None:
    """What a reader of a row that ran must know to trust its speed: INT8 weights run as
    uint8 (from describe()), or timings too spread for img/s and p50 to agree."""
    notes = []
    weights = (row.get("details") or {}).get("int8_weights")
    if weights:
        notes.append(f"{weights}; exact, but without the fast int8 kernels, so INT8 may be no "
                     "faster than FP32 on this CPU: time it on the target")
    lat = row.get("latency_ms")
    if lat and lat["mean"] > UNSTABLE_MEAN_OVER_P50 * lat["p50"]:
        notes.append(f"unstable timings: mean {_num(lat['mean'])} ms against p50 "
                     f"{_num(lat['p50'])} ms over {row['iters']} calls (img/s follows the "
                     "mean); other work is taking the cores: rerun on a quiet machine, or "
                     "with --threads 1")
    return "; ".join(notes) or None


def table_rows(result: dict, with_paths: bool = False):
    """Rows for the table and notes for the rows that did not run or ran with a caveat
    (and each row's file).

    Rows of one model x backend that did not run for the same reason collapse into one
    line listing their batch sizes; the reason goes to a numbered note.
    """
    rows, notes = [], []
    out: list[list[str]] = []
    for r in result["rows"]:
        key = (r["path"], r["backend"], r["status"], r["reason"])
        if r["latency_ms"] is None and rows and rows[-1]["key"] == key:
            rows[-1]["batches"].append(r["batch"])
            continue
        rows.append({"key": key, "row": r, "batches": [r["batch"]]})
    for entry in rows:
        r = entry["row"]
        status = r["status"]
        why = r["reason"] or runtime_note(r)
        if why:
            note = f"{r['model']} {r['backend']} ({status}): {why}"
            if note not in notes:
                notes.append(note)
            status += f" [{notes.index(note) + 1}]"
        lat = r["latency_ms"] or {}
        out.append(
            [
                r["model"],
                r["backend"],
                runs_on(r),
                ",".join(map(str, entry["batches"])),
                status,
                _num(lat.get("p50")),
                _num(lat.get("p90")),
                _num(lat.get("p99")),
                str(r["iters"]) if r["latency_ms"] else "-",
                _num(r["throughput"]),
                _memory(r) if r["latency_ms"] else "-",
                "-" if r["file_bytes"] is None else f"{r['file_bytes'] / 1e6:.3g}",
                _accuracy(r),
            ]
        )
    if with_paths:
        return out, notes, [entry["row"]["path"] for entry in rows]
    return out, notes


def render(result: dict) -> None:
    from rich import box
    from rich.table import Table

    from kdtool import console

    rows, notes, paths = table_rows(result, with_paths=True)
    keep = [COLUMNS.index(c) for c in TERMINAL]
    colors = {"ok": "green", "unavailable": "yellow"}
    described = {m["path"]: m for m in result["models"]}
    for path in dict.fromkeys(paths):  # one table per model file, in the order of the rows
        mine = [row for p, row in zip(paths, rows, strict=True) if p == path]
        m = described.get(path)
        title = escape(path) + (
            f"  [dim]{m['kind']}, {escape(m['arch'] or '?')}, {m['precision']}, "
            f"{m['file_bytes'] / 1e6:.3g} MB[/dim]"
            if m
            else ""
        )
        t = Table(
            title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1)
        )
        for c in TERMINAL:
            text = c in ("runs on", "status")  # the only columns that may wrap
            t.add_column(
                _HEADER.get(c, c),
                justify="left" if text or c == "backend" else "right",
                no_wrap=not text,
                min_width=11 if c == "status" else None,
            )
        for row in mine:
            cells = [row[i] for i in keep]
            color = colors.get(row[4].split(" [")[0], "red")
            cells[-1] = f"[{color}]{escape(cells[-1])}[/{color}]"
            t.add_row(*cells)
        console.out.print(t)
    for i, note in enumerate(notes, 1):
        console.out.print(f"[{i}] {note}", markup=False, soft_wrap=True)
    console.out.print(_legend(result), markup=False, soft_wrap=True, style="dim")


def _legend(result: dict) -> str:
    s = result["settings"]
    m = result["machine"]
    where = f"{m['cpu']}, {m['usable_cpus']} usable CPUs" + (f", {m['gpu']}" if m["gpu"] else "")
    ran = [r for r in result["rows"] if r["latency_ms"]]
    warmed = sorted({r["warmup_calls"] for r in ran}) or [0]
    warm = f"{warmed[0]}" if len(warmed) == 1 else f"{warmed[0]}-{warmed[-1]}"
    text = (
        f"latency per batch (host array in, logits out), >= {s['min_time']:g} s and "
        f">= {s['min_iters']} calls per cell after {warm} warm-up calls; "
        f"{s['clip']}; img/s = batch / mean latency; peak MB = RSS above the RSS before "
        f"loading the model, its runtime already started (+ GPU memory); on {where}"
    )
    if any(r["iters"] < 100 for r in ran):
        text += "; the p99 of fewer than 100 calls is about the slowest call"
    text += (f"; {s['threads']} CPU thread(s)" if s["threads"] else
             "; the libraries' default CPU threads (one per core)")
    if not s.get("memory_arena", True):
        text += "; ONNX Runtime without its CPU memory arena"
    if s.get("formats") and not s.get("export_dir"):
        text += ("; the --formats exports went to a temporary folder, removed after the run "
                 "(--export-dir keeps them)")
    ref = result.get("reference")
    if ref:
        images = next(r["accuracy"]["images"] for r in result["rows"] if r["accuracy"])
        text += (
            f"; top-1 on {images:,} images of {s['data']} (change vs {ref['model']} "
            f"{ref['backend']} {ref['top1']:.2f}%)"
        )
    return text


def markdown(result: dict) -> str:
    rows, notes = table_rows(result)
    lines = [
        "# kdtool bench",
        "",
        f"`{result['command']}`",
        "",
        f"{result['created']}, kdtool {result['kdtool_version']}, "
        + ", ".join(f"{k} {v}" for k, v in result["machine"]["versions"].items())
        + f", Python {result['machine']['python']}, {result['machine']['platform']}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 5 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines.append("")
    lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    if notes:
        lines.append("")
    lines += [_legend(result) + ".", ""]
    return "\n".join(lines)


def write_markdown(result: dict, path: Path) -> None:
    atomic_write_text(path, markdown(result))


def check_plot_path(path: Path) -> str:
    """The plot format of ``path``, checked with matplotlib's presence before the bench."""
    from kdtool.analyze import require_matplotlib

    fmt = path.suffix.lower().lstrip(".")
    if fmt not in PLOT_FORMATS:
        raise KdtoolError(
            f"cannot tell the plot format of '{path}'", "end the file name in .png, .svg or .pdf"
        )
    require_matplotlib("--plot")
    return fmt


def write_plot(result: dict, path: Path) -> None:
    """Latency (p50, with the p50..p99 band) and throughput against batch size, per series."""
    fmt = check_plot_path(path)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    from kdtool.analyze import pyplot

    plt = pyplot()

    series: dict[str, list[dict[str, Any]]] = {}
    for r in result["rows"]:
        if r["latency_ms"] is not None:
            series.setdefault(f"{r['model']} · {r['backend']}", []).append(r)
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, rs) in enumerate(series.items()):
        rs = sorted(rs, key=lambda r: r["batch"])
        b = [r["batch"] for r in rs]
        p50 = [r["latency_ms"]["p50"] for r in rs]
        # a marker and a dash pattern each: the series tell apart in greyscale too
        style = {"marker": "os^Dv<>p"[i % 8], "linestyle": ("-", "--", "-.", ":")[i % 4]}
        (line,) = ax_lat.plot(b, p50, label=label, **style)
        ax_lat.fill_between(
            b, p50, [r["latency_ms"]["p99"] for r in rs], alpha=0.15, color=line.get_color()
        )
        ax_thr.plot(b, [r["throughput"] for r in rs], label=label, color=line.get_color(),
                    **style)
    for ax, ylabel in (
        (ax_lat, "latency per batch, ms (p50; band to p99)"),
        (ax_thr, "throughput, images/s"),
    ):
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            batches = sorted({r["batch"] for rs in series.values() for r in rs})
            ax.set_xticks(batches, [str(b) for b in batches])  # the sizes measured, as numbers
            ax.xaxis.set_minor_locator(NullLocator())
            # values between the decades read off the axis: 1, 2 and 5 of each labelled
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(
                lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:.2g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
    if series:
        ax_thr.legend(fontsize=8)
    else:
        ax_lat.text(0.5, 0.5, "no backend ran", ha="center", transform=ax_lat.transAxes)
    m, settings = result["machine"], result["settings"]
    threads = (f"{settings['threads']} CPU thread{'s' * (settings['threads'] != 1)}"
               if settings.get("threads") else "default CPU threads (one per core)")
    fig.suptitle(f"kdtool bench on {m['gpu'] or m['cpu']}, {threads}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
    plt.close(fig)
