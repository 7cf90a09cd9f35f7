"""Terminal output: rich progress bars and tables on stderr, results (tables or JSON) on stdout."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

# Logs and progress go to stderr so that stdout carries only results (``--json`` stays parseable).
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class _RateColumn(ProgressColumn):
    """Items per second, in the unit of the task (``img``, ``batch``, ...)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        text = "?" if speed is None else f"{speed:,.0f}" if speed >= 100 else f"{speed:.1f}"
        return Text(f"{text} {unit}/s", style="progress.data.speed")


def make_progress(transient: bool = False) -> Progress:
    """A progress bar with count, rate, elapsed time, ETA and a free-form ``info`` field."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err,
        transient=transient,
    )


@contextmanager
def progress_task(description: str, total: int | None, unit: str = "it", transient=False):
    """``with progress_task("decode", n, unit="img") as advance: advance(k, info="...")``."""
    with make_progress(transient=transient) as prog:
        task = prog.add_task(description, total=total, info="", unit=unit)

        def advance(n: int = 1, info: str | None = None):
            if info is None:
                prog.advance(task, n)
            else:
                prog.update(task, advance=n, info=info)

        yield advance


def track(items: Iterable, description: str, total: int | None = None, unit="it") -> Iterator:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_task(description, total, unit=unit, transient=True) as advance:
        for item in items:
            yield item
            advance()


def info(message: str) -> None:
    err.print(message)


_warned: set[str] = set()  # messages given with once=True in this command


def warn(message: str, once: bool = False) -> None:
    """``once``: say it only the first time in this command (a file that several stages
    of one command open, such as bench exporting a checkpoint in each format)."""
    if once:
        if message in _warned:
            return
        _warned.add(message)
    err.print(f"[yellow]warning:[/yellow] {message}")


_NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+\s?(%|x|ms|s|MB|M|K)?$")


def _numeric(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    return isinstance(v, int | float) or bool(_NUMBER.match(str(v).strip()))


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """A rich table: the first column and text columns left-aligned, numbers right-aligned."""
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        values = [r[i] for r in rows if i < len(r) and r[i] not in (None, "", "-")]
        right = i > 0 and bool(values) and all(_numeric(v) for v in values)
        # Text folds rather than ends in an ellipsis: a file or run name stays whole.
        t.add_column(c, justify="right" if right else "left",
                     overflow="ellipsis" if right else "fold")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t


def print_kv(title: str, rows: list[list[Any]]) -> None:
    """A two-column field/value table on stdout, under a bold title."""
    out.print(f"[bold]{title}[/bold]")
    t = Table(show_header=False)
    t.add_column(style="cyan")
    t.add_column()
    for k, v in rows:
        t.add_row(str(k), _fmt(v))
    out.print(t)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# Whether this command printed its JSON object (a command may emit, then fail: bench).
json_emitted = False


def reset() -> None:
    """Forget what the previous command said (main() runs one command per call)."""
    global json_emitted
    json_emitted = False
    _warned.clear()


def emit(result: dict, as_json: bool, render=None) -> None:
    """Print a command's result: exactly one JSON object on stdout, or ``render(result)``."""
    global json_emitted
    if out.quiet:  # a process other than rank 0 of a multi-process run
        return
    if as_json:
        sys.stdout.write(json.dumps(result, default=_json_default) + "\n")
        sys.stdout.flush()
        json_emitted = True
    elif render is not None:
        render(result)


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
