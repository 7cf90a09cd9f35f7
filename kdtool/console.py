"""Terminal output: rich progress bars and tables on stderr, results (tables or JSON) on stdout."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console, ConsoleDimensions
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

PIPE_WIDTH = 400  # results in a pipe or file, when no stream is a terminal and COLUMNS is unset


def _size_off_terminal(self) -> ConsoleDimensions:
    """rich folds tables at 80 columns when no stream is a terminal (nohup, CI, a file):
    there they take their natural width instead, up to PIPE_WIDTH; COLUMNS still rules."""
    size = Console.size.fget(self)
    if self._width is None and "COLUMNS" not in self._environ and not _any_terminal():
        return ConsoleDimensions(PIPE_WIDTH, size.height)
    return size


def _any_terminal() -> bool:
    # The streams rich asks for a terminal size.
    for fd in (0, 1, 2):
        try:
            os.get_terminal_size(fd)
        except (AttributeError, ValueError, OSError):
            continue
        return True
    return False


class _Console(Console):
    size = property(_size_off_terminal, Console.size.fset)


# Logs and progress go to stderr so that stdout carries only results (``--json`` stays parseable).
err = Console(stderr=True, highlight=False)
out = _Console(highlight=False)
# In a log file (nohup, SLURM, CI) a message is one line that grep finds whole, not text
# folded at rich's default 80 columns.
err.soft_wrap = not err.is_terminal

PROGRESS_MODES = ("auto", "bar", "lines", "off")
LINE_EVERY_S = 30.0  # lines mode: at least one line this often on long work
LINE_EVERY_FRACTION = 0.1  # ... and one per tenth of the work,
LINE_MIN_S = 5.0  # but not more often than this: a few seconds' work gets its last line only


def progress_mode() -> str:
    """``$KDTOOL_PROGRESS``: ``bar`` (rich, redrawn in place), ``lines`` (plain lines that a
    log keeps), ``off``; ``auto`` (default) is ``bar`` on a terminal and ``lines`` elsewhere."""
    mode = os.environ.get("KDTOOL_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in PROGRESS_MODES:
        warn(f"KDTOOL_PROGRESS={mode!r} is not one of {', '.join(PROGRESS_MODES)}; using auto",
             once=True)
        mode = "auto"
    if mode == "auto":
        return "bar" if err.is_terminal or err.is_jupyter else "lines"
    return mode


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


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _count(n: float) -> str:
    return f"{n:,.0f}"


def rate_text(rate: float) -> str:
    """A rate at its useful precision: 12,345 and 123 whole, 6.3 and 0.42 with decimals (a
    large model on a CPU runs below one image a second, which a whole number shows as 0)."""
    if rate >= 100:
        return f"{rate:,.0f}"
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"


def params_text(n: int) -> str:
    """A parameter count as people quote it: 11.17M, 1.6K (a test model has a few thousand)."""
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K" if n >= 1000 else str(n)


class _LineProgress:
    """Progress as plain lines for logs: one per tenth of the work (at most one per
    ``LINE_MIN_S``) or per ``LINE_EVERY_S``, whichever comes first, and a last one at the
    end. A transient task (a short decode or evaluation) only reports when it runs long,
    and says nothing at the end."""

    def __init__(self, description: str, total: int | None, unit: str, transient: bool,
                 completed: int, clock=time.monotonic):
        self.description, self.total, self.unit = description, total, unit
        self.transient = transient
        self.clock = clock
        self.completed = self.start_completed = completed
        self.t0 = self.last_t = clock()
        self.last_fraction = completed / total if total else 0.0
        self.info = ""
        self.printed = 0

    def advance(self, n: int = 1, info: str | None = None) -> None:
        self.completed += n
        if info is not None:
            self.info = info
        now = self.clock()
        since = now - self.last_t
        due = since >= LINE_EVERY_S
        if not self.transient and self.total and since >= LINE_MIN_S:
            due |= self.completed / self.total - self.last_fraction >= LINE_EVERY_FRACTION - 1e-9
        if due and (not self.total or self.completed < self.total):
            self._line(now)

    def finish(self) -> None:
        if not self.transient and self.completed > self.start_completed:
            self._line(self.clock())

    def line(self, now: float) -> str:
        elapsed = now - self.t0
        done = self.completed - self.start_completed  # work of this run: a resume skips ahead
        rate = done / elapsed if elapsed > 0 else None
        parts = [self.description]
        if self.total:
            parts.append(f"{100 * self.completed / self.total:3.0f}% "
                         f"{_count(self.completed)}/{_count(self.total)} {self.unit}")
        else:
            parts.append(f"{_count(self.completed)} {self.unit}")
        if rate:
            parts.append(f"{rate_text(rate)} {self.unit}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if rate and self.total and self.completed < self.total:
            parts.append(f"eta {_clock((self.total - self.completed) / rate)}")
        if self.info:
            parts.append(self.info)
        return "  ".join(parts)

    def _line(self, now: float) -> None:
        err.print(self.line(now), markup=False)
        self.printed += 1
        self.last_t = now
        if self.total:
            self.last_fraction = self.completed / self.total


@contextmanager
def progress_task(description: str, total: int | None, unit: str = "it", transient=False,
                  completed: int = 0):
    """``with progress_task("decode", n, unit="img") as advance: advance(k, info="...")``.
    ``completed``: work already done (a resumed run), so rates count this run's work only.
    Drawn as ``progress_mode()`` says."""
    mode = progress_mode()
    if mode != "bar":
        lines = _LineProgress(description, total, unit, transient, completed)

        def advance_line(n: int = 1, info: str | None = None):
            if mode == "lines":
                lines.advance(n, info)

        yield advance_line
        if mode == "lines":
            lines.finish()
        return
    with make_progress(transient=transient) as prog:
        task = prog.add_task(description, total=total, info="", unit=unit, completed=completed)

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


# Messages carry paths, class names and exception text ("runs/[exp1]/s.safetensors", a
# class "[/dog]"): printed as rich markup, brackets vanished or raised MarkupError. So
# they print as plain text; kdtool's own styling is added around them, never inside.
def info(message: str, heading: str = "") -> None:
    """``message`` as plain text; ``heading``, in bold before it, is kdtool's own words."""
    err.print(Text.assemble((heading, "bold"), message) if heading else Text(message))


_warned: set[str] = set()  # messages given with once=True in this command


def warn(message: str, once: bool = False) -> None:
    """``once``: say it only the first time in this command (a file that several stages
    of one command open, such as bench exporting a checkpoint in each format)."""
    if once:
        if message in _warned:
            return
        _warned.add(message)
    err.print(Text.assemble(("warning:", "yellow"), " ", message))


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
        t.add_row(*[Text(_fmt(v)) for v in r])
    return t


def print_kv(title: str, rows: list[list[Any]]) -> None:
    """A two-column field/value table on stdout, under a bold title."""
    out.print(Text(title, "bold"))
    t = Table(show_header=False)
    t.add_column(style="cyan")
    t.add_column()
    for k, v in rows:
        t.add_row(Text(str(k)), Text(_fmt(v)))
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
