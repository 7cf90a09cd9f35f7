"""kdtool's command line: ``kdtool`` and ``python -m kdtool``."""

from kdtool.analyze import cli as _analyze_cli  # noqa: F401  (analyses)
from kdtool.calibrate import cli as _calibrate_cli  # noqa: F401  (stage commands)
from kdtool.cli import demo_cmd, model_cmds, train_cmds  # noqa: F401  (register the commands)
from kdtool.cli.app import app, main
from kdtool.deploy import bench_cli as _bench_cli  # noqa: F401  (stage commands)
from kdtool.deploy import serve_cli as _serve_cli  # noqa: F401  (stage commands)
from kdtool.distill import cli as _distill_cli  # noqa: F401  (stage commands)
from kdtool.export import cli as _export_cli  # noqa: F401  (stage commands)

__all__ = ["app", "main"]
