"""The paper's analyses as commands (``kdtool analyze ...``): each writes a PNG and a CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from kdtool.errors import KdtoolError


def require_matplotlib(what: str = "kdtool analyze") -> None:
    """Refuse before any work when ``what`` (a command or option) would draw a plot last."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise KdtoolError(f"{what} draws its plots with matplotlib, which is not installed",
                          "pip install 'kdtool[plot]'") from None


def pyplot():
    """matplotlib.pyplot on the Agg backend: no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 100, rect=None) -> None:
    """Write ``fig`` to ``path`` atomically and close it. ``rect``: the part of the figure
    the axes are laid out in (room left for a figure legend)."""
    from kdtool.io import atomic_path

    fig.tight_layout(rect=rect)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...] | None = None) -> None:
    """Rows as CSV (``columns``, or the first row's keys), floats to 6 significant digits."""
    from kdtool.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns or rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
