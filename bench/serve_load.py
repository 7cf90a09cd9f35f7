"""Load generator for ``kdtool serve`` (or any Open Inference Protocol server).

Closed loop: ``--concurrency`` clients each send one request, wait for the answer and
send the next, for ``--duration`` seconds after ``--warmup``.  Each request carries one
image (online serving) drawn from a pool of 64 random inputs, encoded once up front
(JSON or the binary extension), so the client spends its time on HTTP, not encoding.
Every answer is checked against offline ONNX Runtime (a wrong answer is counted, never
a success), and ``--malformed`` mixes in broken requests that must get 400.

For each ``--configs`` entry (``max_batch:max_delay_ms[:workers[:threads]]``; threads
default to --threads) it starts ``kdtool serve`` as
a subprocess, runs the load, reads the server's /metrics (mean batch size) and reports
images/s, p50/p90/p99 latency, status counts, and the CPU used by server and client
(the client shares the machine: its CPU share says whether it was the bottleneck; a
``--ceiling`` run against /v2/health/live gives the client's request rate on a trivial
endpoint).

    python bench/serve_load.py                    # resnet18 (CIFAR, random weights): 32:5 vs 1:0
    python bench/serve_load.py --configs 32:5,1:0 --concurrency 32 --duration 20 --ceiling
    python bench/serve_load.py --malformed 0.1 --configs 32:5   # fault mix at scale
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path("/tmp/kdtool-bench")


def default_model(arch: str) -> Path:
    """--model's default: each architecture its own file (one name for all mislabelled runs)."""
    return BENCH_DIR / f"{arch}_cifar.onnx"
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


# ----------------------------------------------------------------------------- the model


def export_zoo(path: Path, arch: str = "resnet18", size: int = 32, num_classes: int = 10) -> Path:
    """A random-weight zoo model (CIFAR stem) exported by ``kdtool export`` to ``path``.

    Random weights serve at the same speed as trained ones; the figures are about speed.
    """
    from make_bench_models import make_models  # bench/ is on sys.path for bench scripts

    _, onnx = make_models(arch, path.parent, size, num_classes, force=True)
    if onnx != path:
        onnx.replace(path)
    return path


def input_pool(path: Path, n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """``n`` normalised random images, their offline logits, and the model's spec.

    The logits have shape (2, n, classes): a plain onnxruntime session's and kdtool's
    (``open_session``, which runs a symmetric INT8 graph with uint8 activations: the same
    grid, other rounding). Either is a right answer; for a float model they are equal.
    """
    from kdtool.export.metadata import read_info
    from kdtool.export.ort_session import open_session

    info = read_info(path)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, *info.input_shape(1)[1:]), dtype=np.uint8)
    shape = [1, -1, 1, 1] if info.layout == "NCHW" else [1, 1, 1, -1]
    x = (pixels / 255 - np.reshape(info.mean, shape)) / np.reshape(info.std, shape)
    x = x.astype(np.float32)
    y = np.stack(
        [
            np.concatenate([s.run(None, {info.input_name: x[i : i + 1]})[0] for i in range(n)])
            for s in (
                open_session(path, uint8_on_cpu=False).session,
                open_session(path).session,
            )
        ]
    )
    return x, y, {"input": info.input_name, "output": info.output_name, "name": path.stem}


def encode(x: np.ndarray, spec: dict, binary: bool) -> tuple[bytes, dict]:
    t = {"name": spec["input"], "shape": list(x.shape), "datatype": "FP32"}
    if not binary:
        return json.dumps({"inputs": [{**t, "data": x.ravel().tolist()}]}).encode(), {
            "Content-Type": "application/json"
        }
    header = json.dumps(
        {
            "inputs": [{**t, "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": spec["output"], "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def malformed_pool(x: np.ndarray, spec: dict) -> list[tuple[bytes, dict]]:
    """Broken requests, each of which a correct server answers with 400."""
    good = json.loads(encode(x, spec, False)[0])
    t = good["inputs"][0]
    bad_shape = [1, *t["shape"][1:-1], t["shape"][-1] + 1]
    nan = x.copy()
    nan.flat[5] = np.nan
    return [
        (b'{"inputs": [{"name": ', {}),
        (json.dumps({"inputs": [{**t, "name": "nope"}]}).encode(), {}),
        (json.dumps({"inputs": [{**t, "shape": bad_shape}]}).encode(), {}),
        (json.dumps({"inputs": [{**t, "datatype": "INT8"}]}).encode(), {}),
        (json.dumps({"inputs": [{**t, "data": t["data"][:-1]}]}).encode(), {}),
        encode(nan, spec, True),
        (encode(x, spec, True)[0][:-16], encode(x, spec, True)[1]),
        (b"\x89PNG not json", {}),
    ]


def decode(content: bytes, header_length: str | None) -> np.ndarray:
    if header_length is None:
        return np.asarray(json.loads(content)["outputs"][0]["data"], np.float32)
    return np.frombuffer(content[int(header_length) :], "<f4")


# ----------------------------------------------------------------------------- the load


async def _load(
    url: str,
    requests: list,
    expected: list,
    concurrency: int,
    duration: float,
    warmup: float,
    headers: dict,
) -> dict:
    import aiohttp

    # (start, end, status, valid request?, right answer?: 200 + offline logits, or 400)
    records: list[tuple[float, float, int, bool, bool]] = []
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration
    counter = iter(range(10**12))

    async def client(session) -> None:
        while (now := time.perf_counter()) < t_end:
            i = next(counter) % len(requests)
            body, extra = requests[i]
            async with session.post(url, data=body, headers={**headers, **extra}) as r:
                content = await r.read()
                done = time.perf_counter()
                valid = expected[i] is not None
                if not valid:
                    ok = r.status == 400
                elif r.status != 200:
                    ok = False
                else:
                    got = decode(content, r.headers.get("Inference-Header-Content-Length"))
                    ok = any(
                        got.shape == e.shape and np.allclose(got, e, rtol=1e-4, atol=1e-4)
                        for e in expected[i]
                    )
                if now >= t_measure:
                    records.append((now, done, r.status, valid, ok))

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        cpu0 = time.process_time()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        cpu = time.process_time() - cpu0
    wall = time.perf_counter() - t_measure
    return {
        "records": records,
        "wall": wall,
        "client_cpu_s": cpu,
        "total_wall": time.perf_counter() - t_start,
    }


def run_load(
    url: str,
    requests: list,
    expected: list,
    *,
    concurrency: int = 32,
    duration: float = 20.0,
    warmup: float = 3.0,
    headers: dict | None = None,
    images_per_request: int = 1,
) -> dict:
    """Drive ``url`` and summarise: img/s, latency percentiles (ms), statuses, correctness."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    raw = runner(_load(url, requests, expected, concurrency, duration, warmup, headers or {}))
    recs = raw["records"]
    lat = np.array([(d - s) * 1000 for s, d, _, valid, ok in recs if valid and ok])
    statuses: dict[str, int] = {}
    for rec in recs:
        statuses[str(rec[2])] = statuses.get(str(rec[2]), 0) + 1
    ok = sum(1 for rec in recs if rec[3] and rec[4])

    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q)) if len(lat) else None

    return {
        "requests": len(recs),
        "ok": ok,
        "wrong": sum(1 for rec in recs if not rec[4]),
        "statuses": statuses,
        "images_per_s": ok * images_per_request / raw["wall"],
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "client_cpu_pct": 100 * raw["client_cpu_s"] / raw["total_wall"],
        "seconds": raw["wall"],
    }


def ceiling(url: str, concurrency: int, duration: float) -> float:
    """Requests/s this client reaches on GET /v2/health/live: its own ceiling (with server)."""
    import aiohttp

    async def go() -> float:
        n = 0
        t_end = time.perf_counter() + duration

        async def client(session):
            nonlocal n
            while time.perf_counter() < t_end:
                async with session.get(url) as r:
                    await r.read()
                    n += 1

        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency)
        ) as session:
            t0 = time.perf_counter()
            await asyncio.gather(*(client(session) for _ in range(concurrency)))
            return n / (time.perf_counter() - t0)

    return asyncio.run(go())


# ----------------------------------------------------------------------------- the servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def start_kdtool(
    model: Path, max_batch: int, max_delay_ms: float, threads: int, max_queue: int = 4096,
    workers: int = 1,
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "kdtool",
        "serve",
        str(model),
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--max-delay-ms",
        str(max_delay_ms),
        "--threads",
        str(threads),
        "--max-queue",
        str(max_queue),
        "--workers",
        str(workers),
    ]
    env = {k: v for k, v in os.environ.items() if k != "KDTOOL_API_KEY"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + "/v2/health/ready", proc)
    return proc, base


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mean_batch(base: str) -> float | None:
    import urllib.request

    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    s = re.search(r"^kdtool_batch_size_sum ([0-9.e+-]+)$", text, re.M)
    c = re.search(r"^kdtool_batch_size_count ([0-9.e+-]+)$", text, re.M)
    return float(s.group(1)) / float(c.group(1)) if s and c and float(c.group(1)) else None


def parse_config(text: str, threads: int) -> tuple[int, float, int, int]:
    """``max_batch:max_delay_ms[:workers[:threads]]``."""
    parts = text.split(":")
    workers = int(parts[2]) if len(parts) > 2 else 1
    return int(parts[0]), float(parts[1]), workers, int(parts[3]) if len(parts) > 3 else threads


def bench_kdtool(
    model: Path, max_batch: int, max_delay_ms: float, workers: int, threads: int, args,
    requests, expected, spec
) -> dict:
    proc, base = start_kdtool(model, max_batch, max_delay_ms, threads, workers=workers)
    try:
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        r = run_load(
            f"{base}/v2/models/{spec['name']}/infer",
            requests,
            expected,
            concurrency=args.concurrency,
            duration=args.duration,
            warmup=args.warmup,
        )
        r["server_cpu_pct"] = 100 * (cpu_seconds(proc.pid) - cpu0) / (time.perf_counter() - t0)
        r["mean_batch"] = mean_batch(base)
        if args.ceiling:
            r["client_ceiling_req_s"] = ceiling(base + "/v2/health/live", args.concurrency, 5)
    finally:
        stop(proc)
    r["server"] = (f"kdtool serve --max-batch {max_batch} --max-delay-ms {max_delay_ms:g} "
                   f"--workers {workers} --threads {threads}")
    return r


def ort_bound(model: Path, threads: int, batches: list[int], seconds: float = 5.0) -> dict:
    """Images/s of ONNX Runtime alone (the server's own session options) per batch size.

    No server can beat these: their ratio bounds what batching can gain at the HTTP level.
    """
    from kdtool.deploy.server.model import OnnxModel

    m = OnnxModel(model, threads=threads)
    out = {}
    for b in batches:
        x = np.zeros((b, *m.input.shape[1:]), m.input.dtype)
        m.run(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            m.run(x)
            n += 1
        out[b] = n * b / (time.perf_counter() - t0)
    return out


def build_requests(x, y, spec, binary: bool, malformed: float, seed: int = 1):
    """Request pool: one image per request; ``malformed`` of them broken (expected None)."""
    rng = np.random.default_rng(seed)
    requests, expected = [], []
    bad = malformed_pool(x[:1], spec)
    for i in range(1000):
        if rng.random() < malformed:
            requests.append(bad[i % len(bad)])
            expected.append(None)
        else:
            j = i % len(x)
            requests.append(encode(x[j : j + 1], spec, binary))
            expected.append([ref[j] for ref in y])
    return requests, expected


def table(rows: list[dict]) -> str:
    """Markdown; "img per CPU-s" = images per second of server CPU: robust to a shared machine."""
    out = [
        "| server | img/s | p50 ms | p90 ms | p99 ms | mean batch | statuses | wrong | "
        "server CPU | img per CPU-s | client CPU |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        mb = f"{r['mean_batch']:.1f}" if r.get("mean_batch") else "-"
        cpu = r.get("server_cpu_pct") or 0
        eff = f"{100 * r['images_per_s'] / cpu:,.0f}" if cpu else "-"
        out.append(
            f"| {r['server']} | {r['images_per_s']:,.0f} | {r['p50_ms']:.1f} | "
            f"{r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {mb} | "
            f"{' '.join(f'{k}:{v}' for k, v in sorted(r['statuses'].items()))} | "
            f"{r['wrong']} | {cpu:.0f}% | {eff} | {r['client_cpu_pct']:.0f}% |"
        )
    return "\n".join(out)


def ratios(a: dict, b: dict) -> str:
    eff = [100 * r["images_per_s"] / r["server_cpu_pct"] for r in (a, b)]
    return (
        f"throughput {a['images_per_s'] / b['images_per_s']:.2f}x, images per server "
        f"CPU-second {eff[0] / eff[1]:.2f}x, p99 {a['p99_ms']:.0f} ms vs {b['p99_ms']:.0f} ms"
    )


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (a real run, not a mix of several)."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        type=Path,
        help="kdtool ONNX file; exported from the zoo (--arch) when missing (default: "
        "/tmp/kdtool-bench/ARCH_cifar.onnx, so that each architecture has its own file)",
    )
    p.add_argument(
        "--arch",
        default="resnet18",
        help="zoo model to export when --model is missing (CIFAR 32x32, random weights)",
    )
    p.add_argument(
        "--configs",
        default="32:0,1:0",
        help="max_batch:max_delay_ms pairs, each a kdtool serve run",
    )
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads of the server")
    p.add_argument("--binary", action="store_true", help="binary tensor extension, not JSON")
    p.add_argument("--malformed", type=float, default=0.0, help="share of broken requests")
    p.add_argument("--repeats", type=int, default=1, help="runs per config, alternating")
    p.add_argument("--ceiling", action="store_true", help="also measure the client's ceiling")
    p.add_argument(
        "--ort-bound",
        action="store_true",
        help="also time ONNX Runtime alone at batch 1 and at each --max-batch",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    args.model = args.model or default_model(args.arch)
    if not args.model.exists():
        print(f"exporting zoo {args.arch} (random weights) to {args.model}", file=sys.stderr)
        export_zoo(args.model, args.arch)
    x, y, spec = input_pool(args.model)
    requests, expected = build_requests(x, y, spec, args.binary, args.malformed)
    configs = [parse_config(c, args.threads) for c in args.configs.split(",")]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for rep in range(args.repeats):  # alternate the order: drift on a shared machine cancels
        for cfg in configs if rep % 2 == 0 else configs[::-1]:
            r = bench_kdtool(args.model, *cfg, args, requests, expected, spec)
            print(json.dumps(r), flush=True)
            runs[cfg].append(r)
    rows = [median_run(runs[c]) for c in configs]
    print(
        f"\n{spec['name']}: {args.concurrency} concurrent clients, 1 image per request, "
        f"{'binary' if args.binary else 'JSON'}, {args.duration:g} s each, "
        f"{args.threads} ORT threads, {os.cpu_count()} cores, median of {args.repeats}\n"
    )
    print(table(rows))
    if args.ort_bound:
        sizes = sorted({1, *(int(c.split(":")[0]) for c in args.configs.split(","))})
        bound = ort_bound(args.model, args.threads, sizes)
        print(
            "\nONNX Runtime alone (same session options, no HTTP): "
            + ", ".join(f"batch {b}: {v:,.0f} img/s" for b, v in bound.items())
        )
        rows.append({"ort_bound_images_per_s": bound})
    served = [r for r in rows if "server" in r]
    if len(served) >= 2:
        print("\nfirst config / last config: " + ratios(served[0], served[-1]))
    if args.json:
        all_runs = {f"{mb}:{d:g}:{w}:{t}": v for (mb, d, w, t), v in runs.items()}
        args.json.write_text(json.dumps({"runs": all_runs, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
