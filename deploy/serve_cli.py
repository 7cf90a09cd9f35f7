"""``kdtool serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kdtool.cli.app import app
from kdtool.errors import MAX_THREADS
from kdtool.export.ort_session import MEMORY_ARENA_HELP

SERVE_DEPS = ("uvicorn", "starlette", "prometheus_client", "orjson")
MAX_DELAY_MS = 60_000.0  # a minute: longer is no batching delay but a hung request


@app.command("serve")
def serve_cmd(
    model: Annotated[
        Path, typer.Argument(help="An .onnx file written by 'kdtool export'.", show_default=False)
    ],
    host: Annotated[
        str, typer.Option("--host", help="Address to bind. Anything but loopback needs --api-key.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free port).")
    ] = 8000,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Model name in the URLs.", show_default="the file's stem"),
    ] = None,
    max_batch: Annotated[
        int,
        typer.Option(
            "--max-batch",
            min=1,
            help="Images per ONNX Runtime call (1: no batching).",
            rich_help_panel="Batching",
        ),
    ] = 32,
    max_delay_ms: Annotated[
        float,
        typer.Option(
            "--max-delay-ms",
            min=0.0,
            help="How long the oldest queued request may wait for others to share its batch. "
            "0 (the default, as Triton's): a request is served at once when a worker is free, "
            "and batches form from requests that queue while a batch runs, so a lone client "
            "never waits; a few ms helps only when load is just short of saturating.",
            rich_help_panel="Batching",
        ),
    ] = 0.0,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue",
            min=1,
            help="Images that may wait for a batch; beyond it requests get 503.",
            rich_help_panel="Batching",
        ),
    ] = 512,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            help="ONNX Runtime calls in flight at once; with N workers give each "
            "--threads cores/N (on a small CPU 2 x 1 thread beats 1 x 2).",
            rich_help_panel="Batching",
        ),
    ] = 1,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=0,
            help="ONNX Runtime intra-op threads per worker (0: the cores shared "
            "among the workers, one per core for one worker).",
            rich_help_panel="Batching",
        ),
    ] = 0,
    memory_arena: Annotated[
        bool,
        typer.Option("--memory-arena/--no-memory-arena", help=MEMORY_ARENA_HELP,
                     rich_help_panel="Batching"),
    ] = True,
    provider: Annotated[
        str,
        typer.Option(
            "--provider",
            help="ONNX Runtime provider: cpu, cuda or trt (TensorRT, with CUDA for the nodes "
            "it cannot take; 'tensorrt' works too); never falls back silently.",
        ),
    ] = "cpu",
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="KDTOOL_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on all but the health endpoints.",
            rich_help_panel="Security",
        ),
    ] = None,
    max_body_mb: Annotated[
        float,
        typer.Option(
            "--max-body-mb",
            min=0.001,
            help="Largest request body; larger ones get 413.",
            rich_help_panel="Security",
        ),
    ] = 16.0,
    body_idle_s: Annotated[
        float,
        typer.Option(
            "--body-timeout",
            help="Seconds a request body's bytes may stop coming before the request gets "
            "408 (raise it for clients on slow links).",
            rich_help_panel="Security",
        ),
    ] = 15.0,
) -> None:
    """Serve an ONNX model over HTTP (Open Inference Protocol, dynamic batching).

    GET /v2/health/live, /v2/health/ready, /v2, /v2/models/NAME,
    /v2/models/NAME/ready and /metrics (Prometheus).
    POST /v2/models/NAME/infer: JSON or binary tensors (tritonclient works).
    POST /v2/models/NAME/classify: JPEG, PNG, WebP, BMP, GIF or TIFF bytes -> top-k
    labels, with the model's own preprocessing. Ctrl-C or SIGTERM finishes requests in flight.

    Example: [bold]kdtool serve student.onnx --port 8000 --max-batch 32[/bold]
    """
    import importlib.util

    from kdtool.errors import KdtoolError, check_threads

    if max_delay_ms > MAX_DELAY_MS:  # longer is no batching delay but a hung request
        raise KdtoolError(f"--max-delay-ms {max_delay_ms:g} is more than a minute",
                          "a few ms at most: 0 (the default) serves a lone request at once")
    if workers > MAX_THREADS:
        raise KdtoolError(f"--workers {workers} is more than kdtool runs ({MAX_THREADS})",
                          "one per core at most")
    if not 0.1 <= body_idle_s <= 3600:
        raise KdtoolError(f"--body-timeout {body_idle_s:g} is not 0.1 to 3600 seconds",
                          "e.g. --body-timeout 60 for clients on slow links")
    check_threads(threads)
    threads = threads_per_worker(workers, threads, provider)
    missing = [m for m in SERVE_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise KdtoolError(f"kdtool serve needs {', '.join(missing)}", "pip install 'kdtool[serve]'")
    from kdtool.deploy.server import ServerConfig, serve

    config = ServerConfig(
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        workers=workers,
        max_body_mb=max_body_mb,
        body_idle_s=body_idle_s,
        api_key=api_key or None,
    )
    serve(model, host=host, port=port, name=name, provider=provider, threads=threads,
          memory_arena=memory_arena, config=config)


def threads_per_worker(workers: int, threads: int, provider: str) -> int:
    """--threads for each worker: 0 with several CPU workers shares the cores among them
    (ONNX Runtime's own default, one thread per core each, would run workers x cores
    threads on the cores); a product over the cores is said."""
    from kdtool import console
    from kdtool.runinfo import usable_cores

    if workers == 1 or provider != "cpu":
        return threads
    cores = usable_cores()
    if threads == 0:
        threads = max(1, cores // workers)
        console.info(f"--workers {workers} on {cores} cores: --threads {threads} each")
    elif workers * threads > cores:
        console.warn(f"--workers {workers} x --threads {threads} is {workers * threads} "
                     f"threads on {cores} cores: they will take turns, slower than fewer "
                     f"(e.g. --threads {max(1, cores // workers)})")
    return threads
