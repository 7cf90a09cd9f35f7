"""kdtool's command line: ``kdtool`` and ``python -m kdtool``."""

import importlib

from kdtool.cli.app import app, main

# Importing a module registers its commands; this order is the order of `kdtool --help`:
# the pipeline's, then the analyses and the model utilities.
for _module in (
    "kdtool.cli.demo_cmd",
    "kdtool.cli.train_cmds",
    "kdtool.distill.cli",
    "kdtool.calibrate.cli",
    "kdtool.export.cli",
    "kdtool.deploy.bench_cli",
    "kdtool.deploy.serve_cli",
    "kdtool.deploy.predict_cli",
    "kdtool.analyze.cli",
    "kdtool.cli.model_cmds",
):
    importlib.import_module(_module)

__all__ = ["app", "main"]
