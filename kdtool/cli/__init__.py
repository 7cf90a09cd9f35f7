"""kdtool's command line: ``kdtool`` and ``python -m kdtool``."""

from kdtool.cli import model_cmds, train_cmds  # noqa: F401  (register the commands)
from kdtool.cli.app import app, main
from kdtool.distill import cli as _distill_cli  # noqa: F401  (stage commands)

__all__ = ["app", "main"]
