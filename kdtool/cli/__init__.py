"""kdtool's command line: ``kdtool`` and ``python -m kdtool``."""

from kdtool.cli import model_cmds, train_cmds  # noqa: F401  (register the commands)
from kdtool.cli.app import app, main

__all__ = ["app", "main"]
