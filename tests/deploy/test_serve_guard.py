"""kdtool serve against slow and hostile clients: heads too large or too slow, stalled
bodies, requests whose images would hold the decoding threads, and a stop that outlasts a
request."""

from __future__ import annotations

import io
import json
import logging
import signal
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from kdtool.deploy.server import guard, images

LIVE = "/v2/health/live"
CLASSIFY = "/v2/models/tiny/classify"


def _connect(srv) -> socket.socket:
    host, port = srv.host_port.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _answer(sock: socket.socket) -> tuple[int | None, bytes]:
    """The status and body of the one response the server sends before closing (None: it
    closed without one)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    if not data:
        return None, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "PNG")
    return buf.getvalue()


def _multipart(files: list[bytes]) -> tuple[bytes, str]:
    parts = [b"--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"%d.png\"\r\n"
             b"Content-Type: image/png\r\n\r\n%s\r\n" % (i, f) for i, f in enumerate(files)]
    return b"".join(parts) + b"--B--\r\n", "multipart/form-data; boundary=B"


def test_a_head_over_the_cap_gets_431_and_the_server_goes_on(tiny_server):
    with _connect(tiny_server) as s:
        s.sendall(b"GET " + LIVE.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:  # headers without end, as a client that means harm sends them
            while sent < 4 * guard.MAX_HEAD_BYTES:
                s.sendall(b"a" * 4096)
                sent += 4096
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while still sending: what the cap is for
        status, body = _answer(s)
    assert status == 431, (status, body)
    assert "headers are over 64 KiB" in json.loads(body)["error"]
    with httpx.Client(base_url=tiny_server.url) as c:
        # headers just under the cap, and a head arriving with a large body, are served
        assert c.get(LIVE, headers={"X-Big": "a" * 60_000}).status_code == 200
        r = c.post(CLASSIFY, content=b"\0" * 2_000_000, headers={"Content-Type": "image/png"})
        assert r.status_code == 400 and "not a decodable image" in r.json()["error"]


@pytest.fixture
def quick_deadlines(monkeypatch):
    monkeypatch.setattr(guard, "HEAD_TIMEOUT_S", 0.5)


def test_a_head_that_does_not_finish_in_time_gets_408(serve_model, tiny_onnx, quick_deadlines):
    with serve_model(tiny_onnx) as srv:
        with _connect(srv) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /v2 HTTP/1.1\r\nHo")  # and then nothing, as slowloris does
            status, body = _answer(s)
        assert status == 408 and "did not arrive within 0.5 s" in json.loads(body)["error"]
        assert time.monotonic() - t0 < 5
        with _connect(srv) as s:  # a connection that never sends a byte is closed, unanswered
            assert _answer(s) == (None, b"")
        # An idle keep-alive connection is not a late head: its next request is served.
        with httpx.Client(base_url=srv.url) as c:
            assert c.get(LIVE).status_code == 200
            time.sleep(1.2)
            assert c.get(LIVE).status_code == 200
            assert c.get(LIVE).status_code == 200


def test_a_stalled_body_gets_408(serve_model, tiny_onnx):
    with serve_model(tiny_onnx, body_idle_s=0.5) as srv, _connect(srv) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        t0 = time.monotonic()
        status, body = _answer(s)
    assert status == 408, (status, body)
    assert json.loads(body)["error"] == ("no request body bytes for 0.5 s (1 received): the "
                                         "client stalled")
    assert time.monotonic() - t0 < 5


def test_classify_refuses_too_many_or_too_large_images_before_decoding(
        serve_model, tiny_onnx, monkeypatch):
    loaded = []
    real_load = images.load
    monkeypatch.setattr(images, "load", lambda im, what="": loaded.append(what) or
                        real_load(im, what))
    with serve_model(tiny_onnx, max_queue=4) as srv, httpx.Client(base_url=srv.url) as c:
        body, kind = _multipart([_png()] * 5)
        r = c.post(CLASSIFY, content=body, headers={"Content-Type": kind})
        assert r.status_code == 400 and "a batch of 5 images is more than" in r.json()["error"]
        monkeypatch.setattr(images, "MAX_REQUEST_PIXELS", 3 * 100 * 100)
        body, kind = _multipart([_png((100, 100))] * 4)  # each allowed, not all four
        r = c.post(CLASSIFY, content=body, headers={"Content-Type": kind})
        assert r.status_code == 413, r.text
        assert r.json()["error"].startswith("the request's 4 images hold 0 megapixels, over "
                                            "the 0 megapixel limit of one request")
        assert loaded == []  # refused from the headers: nothing decoded
        body, kind = _multipart([_png((100, 100))] * 3)
        r = c.post(CLASSIFY, content=body, headers={"Content-Type": kind})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        assert len(loaded) == 3


def test_classify_decodes_on_its_own_threads(tiny_server, monkeypatch):
    """A flood of large images waits for the decoding threads; /infer's parsing and the
    inflating of bodies use the loop's default pool, and go on."""
    threads = []
    real = images.preprocess
    monkeypatch.setattr(images, "preprocess", lambda *a: threads.append(
        threading.current_thread().name) or real(*a))
    with httpx.Client(base_url=tiny_server.url) as c:
        r = c.post(CLASSIFY, content=_png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert len(threads) == 1 and threads[0].startswith("kdtool-decode")


def test_a_request_outlasting_the_stop_grace_gets_a_503(serve_model, tiny_onnx, monkeypatch,
                                                         caplog):
    from kdtool.deploy.server import run

    monkeypatch.setattr(run, "GRACE_S", 0.5)
    with serve_model(tiny_onnx, body_idle_s=60) as srv:
        s = _connect(srv)
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1000\r\n\r\n{")
        time.sleep(0.3)  # the request is in the app, waiting for its body
        with caplog.at_level(logging.ERROR):
            srv.server.handle_exit(signal.SIGTERM, None)  # what SIGTERM does
            status, body = _answer(s)
            srv.thread.join(timeout=20)
        s.close()
    assert status == 503, (status, body)
    assert json.loads(body)["error"] == "the server stopped before this request finished"
    assert not srv.thread.is_alive()
    assert "Exception in ASGI application" not in caplog.text


def test_serve_raises_the_open_files_limit(monkeypatch):
    import resource

    from kdtool.deploy.server import run

    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    run.raise_open_files_limit()
    assert calls == [(4096, 4096)]


def test_a_host_that_is_no_address_is_said_before_the_key(cli, tiny_onnx):
    r = cli("serve", tiny_onnx, "--host", "999.1.1.1")
    assert r.code == 1 and "cannot resolve --host '999.1.1.1'" in r.err, r.err
    assert "API key" not in r.err


def test_serve_runs_uvicorn_with_the_guard():
    from kdtool.deploy.server.run import GRACE_S, uvicorn_server

    config = uvicorn_server(object()).config
    assert config.http is guard.GuardedHttpTools
    assert config.timeout_graceful_shutdown == GRACE_S < 30  # a container's stop: 30 s



def test_the_guard_cost_bench_times_both_protocols(tiny_onnx, capsys):
    """bench/serve_guard_cost.py: the same requests against uvicorn's protocol and the
    guarded one, side by side."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "serve_guard_cost.py"
    spec = importlib.util.spec_from_file_location("serve_guard_cost", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from kdtool.deploy.server import OnnxModel, create_app

    app = create_app(OnnxModel(tiny_onnx, threads=1))
    for guarded in (False, True):
        _, server, thread = bench.start(app, guarded)
        assert (server.config.http is guard.GuardedHttpTools) is guarded
        server.should_exit = True
        thread.join(timeout=20)
    figures = bench.main(["--model", str(tiny_onnx), "--requests", "8", "--rounds", "2"])
    assert set(figures) == {"live", "infer", "connect"}
    for f in figures.values():
        assert f["plain"] > 0 and f["ratio"] == f["guarded"] / f["plain"]
    assert "guarded/plain" in capsys.readouterr().out
