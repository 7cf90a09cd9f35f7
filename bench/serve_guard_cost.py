"""What ``kdtool serve``'s guard against slow and hostile clients costs a request.

The guard (``kdtool.deploy.server.guard``: a cap and a deadline on each request's head)
subclasses uvicorn's httptools protocol and adds a little work per connection (a timer) and
per chunk read (a few checks). This runs one model's app on two uvicorn servers in this
process, the plain protocol and the guarded one, and times the same requests against each,
alternating rounds so that both see the same machine:

* ``live``: GET /v2/health/live, no model work: the HTTP path alone, where the guard's
  share is largest;
* ``infer``: POST /v2/models/NAME/infer with one image (JSON);
* ``connect``: /v2/health/live on a new connection each time (the per-connection timer).

    python bench/serve_guard_cost.py                 # resnet8 (CIFAR, random weights)
    python bench/serve_guard_cost.py --requests 2000 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def start(app, guarded: bool):
    """``app`` on a uvicorn server in a thread, on a free loopback port: (url, server)."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from kdtool.deploy.server.run import base_url, bind, uvicorn_server

    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app)
    if not guarded:  # the same settings, uvicorn's own protocol
        server.config.http = HttpToolsProtocol
    assert isinstance(server, uvicorn.Server)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    return base_url("127.0.0.1", sock), server, thread


def rate(url: str, kind: str, n: int, body: bytes, model: str) -> float:
    """Requests per second for ``n`` sequential requests of ``kind``."""
    import httpx

    path = "/v2/health/live" if kind != "infer" else f"/v2/models/{model}/infer"
    t0 = time.perf_counter()
    if kind == "connect":
        for _ in range(n):
            with httpx.Client(base_url=url) as c:
                assert c.get(path).status_code == 200
    else:
        with httpx.Client(base_url=url) as c:
            for _ in range(n):
                r = c.post(path, content=body) if kind == "infer" else c.get(path)
                assert r.status_code == 200, r.text
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet8")
    p.add_argument("--model", type=Path, help="an ONNX model to serve (default: a random-"
                   "weight --arch, made once in /tmp/kdtool-bench)")
    p.add_argument("--requests", type=int, default=1000, help="per round, per kind")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)

    from make_bench_models import make_models

    from kdtool.deploy.server import OnnxModel, ServerConfig, create_app

    onnx = args.model or Path("/tmp/kdtool-bench") / f"{args.arch}.onnx"
    if not onnx.is_file():
        _, onnx = make_models(args.arch, onnx.parent, 32, 10, force=True)
    model = OnnxModel(onnx, threads=1)
    x = np.random.default_rng(0).standard_normal((1, *model.input.shape[1:])).astype(np.float32)
    body = json.dumps({"inputs": [{"name": model.input.name, "shape": list(x.shape),
                                   "datatype": "FP32", "data": x.ravel().tolist()}]}).encode()
    servers = {name: start(create_app(model, ServerConfig()), name == "guarded")
               for name in ("plain", "guarded")}
    kinds = ("live", "infer", "connect")
    for url, _, _ in servers.values():  # warm-up: connections, ORT's first calls
        for kind in kinds:
            rate(url, kind, 50, body, model.name)
    rates = {(name, kind): [] for name in servers for kind in kinds}
    for r in range(args.rounds):
        order = list(servers) if r % 2 == 0 else list(reversed(servers))
        for kind in kinds:
            n = args.requests // (4 if kind == "connect" else 1)
            for name in order:
                rates[name, kind].append(rate(servers[name][0], kind, n, body, model.name))
    for _, server, thread in servers.values():
        server.should_exit = True
        thread.join(timeout=20)

    print(f"{args.model or args.arch}, {args.rounds} alternating rounds of {args.requests} "
          f"requests (connect: {args.requests // 4}); median requests/s, one client thread "
          "in this process")
    print(f"{'kind':<8} {'plain':>9} {'guarded':>9} {'guarded/plain':>14}")
    figures = {}
    for kind in kinds:
        plain = statistics.median(rates["plain", kind])
        guarded = statistics.median(rates["guarded", kind])
        figures[kind] = {"plain": plain, "guarded": guarded, "ratio": guarded / plain}
        print(f"{kind:<8} {plain:>9,.0f} {guarded:>9,.0f} {guarded / plain:>13.3f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
