"""kdtool serve against MLServer on the same ONNX model, same load, same machine, one run.

MLServer (PyPI ``mlserver``, Seldon; Open Inference Protocol, adaptive batching) pins its
own FastAPI/Starlette, so it lives in a virtual environment of its own (``--venv``;
created with ``python -m venv`` + ``pip install mlserver onnxruntime numpy 'uvloop<0.22'``
when missing).  It serves the model through ``bench/mlserver_runtime.py`` (a minimal ONNX
Runtime ``MLModel``) with adaptive batching set to the same size and delay as kdtool's
dynamic batching, and the same ONNX Runtime session options.  Both get the same closed
loop from ``bench/serve_load.py`` (JSON: MLServer has no binary tensor extension), one
after the other, alternating when ``--repeats`` > 1.

    python bench/mlserver_compare.py                       # resnet18 CIFAR, 32 clients, 20 s
    python bench/mlserver_compare.py --repeats 2 --setups 1x2,2x1

``--setups`` lists worker x ORT-thread layouts (``WxT``); each server runs in each layout,
so both are compared at their best as well as at the same settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import serve_load as sl  # noqa: E402  (the sibling script)

MODEL_NAME = "model"


# MLServer 1.7.1's parallel workers crash with uvloop >= 0.22 ("There is no current event
# loop", SeldonIO/MLServer#2286, fix unreleased): pin the last uvloop that works.
VENV_PACKAGES = ["mlserver", "onnxruntime", "numpy", "uvloop<0.22"]


def ensure_venv(venv: Path) -> Path:
    exe = venv / "bin" / "mlserver"
    if not exe.exists():
        print(f"creating {venv} with {' '.join(VENV_PACKAGES)} (pip)...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", *VENV_PACKAGES], capture_output=True, text=True
    )
    if pip.returncode != 0 or not exe.exists():
        sys.exit(f"cannot install mlserver into {venv}:\n{pip.stdout}\n{pip.stderr}")
    return exe


def mlserver_repo(
    root: Path, model: Path, threads: int, max_batch: int, max_delay_ms: float, workers: int
) -> tuple[Path, int]:
    port, grpc, metrics = sl.free_port(), sl.free_port(), sl.free_port()
    folder = root / MODEL_NAME
    folder.mkdir(parents=True)
    shutil.copy(model, folder / "model.onnx")
    shutil.copy(HERE / "mlserver_runtime.py", folder / "mlserver_runtime.py")
    (folder / "model-settings.json").write_text(
        json.dumps(
            {
                "name": MODEL_NAME,
                "implementation": "mlserver_runtime.OnnxRuntimeModel",
                "max_batch_size": max_batch,
                "max_batch_time": max_delay_ms / 1000,
                "parameters": {"uri": "./model.onnx", "extra": {"threads": threads}},
            }
        )
    )
    (root / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": port,
                "grpc_port": grpc,
                "metrics_port": metrics,
                "parallel_workers": workers,
                "debug": False,
            }
        )
    )
    return root, port


def bench_mlserver(
    exe: Path, model: Path, workers: int, threads: int, args, requests, expected
) -> dict:
    with tempfile.TemporaryDirectory(prefix="mlserver-bench-") as tmp:
        root, port = mlserver_repo(
            Path(tmp), model, threads, args.max_batch, args.max_delay_ms, workers
        )
        proc = subprocess.Popen(
            [str(exe), "start", str(root)],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            sl.wait_ready(f"{base}/v2/models/{MODEL_NAME}/ready", proc, timeout=180)
            pids = [proc.pid, *children(proc.pid)]  # parallel workers are child processes
            cpu0, t0 = sum(sl.cpu_seconds(p) for p in pids), time.perf_counter()
            r = sl.run_load(
                f"{base}/v2/models/{MODEL_NAME}/infer",
                requests,
                expected,
                concurrency=args.concurrency,
                duration=args.duration,
                warmup=args.warmup,
            )
            cpu = sum(sl.cpu_seconds(p) for p in pids) - cpu0
            r["server_cpu_pct"] = 100 * cpu / (time.perf_counter() - t0)
        finally:
            sl.stop(proc)
    r["mean_batch"] = None
    r["server"] = (
        f"MLServer {version(exe)}, adaptive batching {args.max_batch} / "
        f"{args.max_delay_ms:g} ms, {workers} worker(s) x {threads} ORT thread(s)"
    )
    return r


def children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(p) for p in out.split()]


def version(exe: Path) -> str:
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout
    return out.strip().split()[-1] if out.strip() else "?"


def parse_setups(text: str) -> list[tuple[int, int]]:
    """'1x2,2x1' -> [(1, 2), (2, 1)] (workers, ORT threads per worker)."""
    setups = []
    for part in text.split(","):
        w, sep, t = part.strip().lower().partition("x")
        if not (sep and w.isdigit() and t.isdigit() and int(w) > 0 and int(t) > 0):
            raise argparse.ArgumentTypeError(f"'{part}' is not WxT (e.g. 1x2)")
        setups.append((int(w), int(t)))
    return setups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="default: /tmp/kdtool-bench/ARCH_cifar.onnx")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--venv", type=Path, default=Path("/tmp/mlserver-venv"))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument(
        "--setups",
        type=parse_setups,
        default=[(1, 2)],
        help="comma-separated WxT: W workers (kdtool serve --workers, MLServer "
        "parallel_workers) of T ORT intra-op threads each; default 1x2",
    )
    p.add_argument(
        "--ort-bound",
        action="store_true",
        help="also time ONNX Runtime alone (no server) at --max-batch on all the threads: "
        "what no server can beat",
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    args.ceiling = False  # read by serve_load.bench_kdtool

    exe = ensure_venv(args.venv)
    args.model = args.model or sl.default_model(args.arch)
    if not args.model.exists():
        print(f"exporting zoo {args.arch} (random weights) to {args.model}", file=sys.stderr)
        sl.export_zoo(args.model, args.arch)
    x, y, spec = sl.input_pool(args.model)
    spec["name"] = args.model.stem
    requests, expected = sl.build_requests(x, y, spec, binary=False, malformed=0.0)
    names = [(who, w, t) for w, t in args.setups for who in ("kdtool", "mlserver")]
    runs: dict[tuple, list[dict]] = {name: [] for name in names}
    for rep in range(args.repeats):
        for who, w, t in names if rep % 2 == 0 else names[::-1]:
            if who == "kdtool":
                r = sl.bench_kdtool(
                    args.model,
                    args.max_batch,
                    args.max_delay_ms,
                    w,
                    t,
                    args,
                    requests,
                    expected,
                    spec,
                )
            else:
                r = bench_mlserver(exe, args.model, w, t, args, requests, expected)
            print(json.dumps(r), flush=True)
            runs[who, w, t].append(r)
    rows = {name: sl.median_run(runs[name]) for name in names}
    print(
        f"\n{args.model.name}: {args.concurrency} concurrent clients, 1 image per request, "
        f"JSON, {args.duration:g} s, median of {args.repeats}\n"
    )
    print(sl.table(list(rows.values())))
    print()
    for w, t in args.setups:
        print(
            f"{w}x{t}, kdtool / MLServer: "
            + sl.ratios(rows["kdtool", w, t], rows["mlserver", w, t])
        )
    best = {
        who: max((r for (n, *_), r in rows.items() if n == who), key=lambda r: r["images_per_s"])
        for who in ("kdtool", "mlserver")
    }
    if len(args.setups) > 1:
        print("each at its best, kdtool / MLServer: " + sl.ratios(best["kdtool"], best["mlserver"]))
    if args.ort_bound:
        threads = max(w * t for w, t in args.setups)
        bound = sl.ort_bound(args.model, threads, [args.max_batch])[args.max_batch]
        print(
            f"ONNX Runtime alone, batch {args.max_batch}, {threads} threads: {bound:.0f} img/s "
            f"= {bound / best['mlserver']['images_per_s']:.2f}x MLServer's best: the most any "
            "server could reach"
        )
    if args.json:
        args.json.write_text(
            json.dumps({f"{n}:{w}x{t}": r for (n, w, t), r in runs.items()}, indent=1)
        )


if __name__ == "__main__":
    main()
