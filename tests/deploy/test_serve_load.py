"""kdtool serve under concurrent load and faults: batching, overload, shutdown (loopback only)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest

URL = "/v2/models/tiny/infer"


def _json(x: np.ndarray) -> dict:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }


def _binary(x: np.ndarray) -> tuple[bytes, dict]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def _malformed(i: int) -> tuple[bytes, dict]:
    """Ten kinds of broken request, each of which must get a 400."""
    x = np.zeros((1, 1, 8, 8), np.float32)
    kinds = [
        (b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8]', {}),  # truncated JSON
        (json.dumps({**_json(x), "inputs": [{**_json(x)["inputs"][0], "name": "x"}]}).encode(), {}),
        (json.dumps({"inputs": [{**_json(x)["inputs"][0], "shape": [1, 1, 4, 16]}]}).encode(), {}),
        (json.dumps({"inputs": [{**_json(x)["inputs"][0], "datatype": "INT64"}]}).encode(), {}),
        (json.dumps({"inputs": [{**_json(x)["inputs"][0], "data": ["z"] * 64}]}).encode(), {}),
        (_binary(np.full_like(x, np.inf))[0], _binary(x)[1]),  # non-finite binary
        (_binary(x)[0][:-8], _binary(x)[1]),  # truncated binary
        (b"\x00\xff" * 40, {}),  # not JSON at all
        (json.dumps({"inputs": [{**_json(x)["inputs"][0], "data": [0.5] * 65}]}).encode(), {}),
        (json.dumps({"inputs": "input"}).encode(), {}),
    ]
    return kinds[i % len(kinds)]


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? ([0-9.e+-]+)$", line)
        if m:
            total += float(m.group(2))
    return total


@pytest.mark.parametrize("workers", [1, 2])
def test_32_clients_with_malformed_requests(serve_model, tiny_onnx, offline, workers):
    """320 requests from 32 concurrent clients, 10% malformed: zero 5xx, exact answers
    (with one ORT call at a time and with two in flight)."""
    rng = np.random.default_rng(0)
    requests = []  # (body, headers, x or None)
    for i in range(320):
        if i % 10 == 7:
            requests.append((*_malformed(i // 10), None))
            continue
        x = rng.standard_normal((int(rng.integers(1, 5)), 1, 8, 8)).astype(np.float32)
        if i % 2:
            requests.append((*_binary(x), x))
        else:
            requests.append((json.dumps(_json(x)).encode(), {}, x))
    answers: list = [None] * len(requests)

    async def client(c: httpx.AsyncClient, todo: list[int]) -> None:
        while todo:
            i = todo.pop()
            body, headers, _ = requests[i]
            r = await c.post(URL, content=body, headers=headers)
            answers[i] = (
                r.status_code,
                r.headers.get("inference-header-content-length"),
                r.content,
            )

    async def main(url: str) -> None:
        todo = list(range(len(requests)))
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as c:
            await asyncio.gather(*(client(c, todo) for _ in range(32)))

    with serve_model(tiny_onnx, max_batch=16, max_delay_ms=2, workers=workers) as srv:
        t0 = time.perf_counter()
        asyncio.run(main(srv.url))
        elapsed = time.perf_counter() - t0
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/v2/health/ready").status_code == 200
            metrics = c.get("/metrics").text
            still = c.post(URL, json=_json(np.ones((1, 1, 8, 8), np.float32)))
            assert still.status_code == 200

    statuses = [a[0] for a in answers]
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    valid = [i for i, r in enumerate(requests) if r[2] is not None]
    bad = [i for i, r in enumerate(requests) if r[2] is None]
    assert len(bad) == 32 and all(statuses[i] == 400 for i in bad)
    for i in bad:
        assert json.loads(answers[i][2])["error"]
    assert all(statuses[i] == 200 for i in valid)
    xs = np.concatenate([requests[i][2] for i in valid])
    expected = offline(tiny_onnx, xs)
    got = []
    for i in valid:
        _, header_len, content = answers[i]
        n = len(requests[i][2])
        if header_len is None:
            y = np.asarray(json.loads(content)["outputs"][0]["data"], np.float32)
        else:
            y = np.frombuffer(content[int(header_len) :], "<f4")
        got.append(y.reshape(n, 10))
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=1e-5, atol=1e-6)
    # the requests really shared ONNX Runtime calls
    batches = _metric(metrics, "kdtool_batch_size_count")
    images = _metric(metrics, "kdtool_batch_size_sum")
    assert images == len(xs) and batches < len(valid), (batches, images)
    assert _metric(metrics, 'kdtool_requests_total{endpoint="infer",status="400"}') == 32
    # the other series README names count the same work
    assert _metric(metrics, "kdtool_inferred_images_total") == len(xs)
    assert _metric(metrics, "kdtool_inference_duration_seconds_count") == batches
    assert _metric(metrics, "kdtool_queue_duration_seconds_count") == len(valid)
    assert _metric(metrics, "kdtool_request_duration_seconds_count") >= len(valid)
    print(f"{len(requests)} requests in {elapsed:.2f}s, {images / batches:.1f} images/batch")


def _slow(srv, seconds: float):
    """Make each ORT call of the running server take ``seconds`` longer."""
    batcher = srv.app.state.batcher
    fast = batcher.run_fn

    def slow(x):
        time.sleep(seconds)
        return fast(x)

    batcher.run_fn = slow
    return batcher


def test_overload_gets_503_and_health_answers_during_a_batch(serve_model, tiny_onnx):
    x = _json(np.zeros((1, 1, 8, 8), np.float32))
    with serve_model(tiny_onnx, max_batch=1, max_queue=1) as srv:
        batcher = _slow(srv, 0.8)

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                first = asyncio.create_task(c.post(URL, json=x))
                while not batcher.running_batch:  # the first batch is running now
                    await asyncio.sleep(0.01)
                health = await c.get("/v2/health/ready")
                during = batcher.running_batch > 0  # answered before the batch ended
                rest = await asyncio.gather(*(c.post(URL, json=x) for _ in range(7)))
                return [await first, *rest], health, during

        responses, health, during = asyncio.run(burst())
        assert health.status_code == 200 and during
        codes = sorted(r.status_code for r in responses)
        # one running, one queued (--max-queue 1), the rest refused
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        for r in responses:
            if r.status_code == 503:
                assert "overloaded" in r.json()["error"] and "--max-queue" in r.json()["error"]
                assert r.headers["retry-after"] == "1"  # what retrying clients read
        with httpx.Client(base_url=srv.url) as c:
            assert _metric(c.get("/metrics").text, "kdtool_rejected_images_total") >= 1
            r = c.post(URL, json=_json(np.zeros((2, 1, 8, 8), np.float32)))
            assert r.status_code == 400 and "more than the server queues" in r.json()["error"]
            batcher.run_fn = srv.app.state.model.run
            assert c.post(URL, json=x).status_code == 200


def test_graceful_shutdown_finishes_in_flight_request(serve_model, tiny_onnx, offline):
    x = np.random.default_rng(4).standard_normal((2, 1, 8, 8)).astype(np.float32)
    result = {}
    with serve_model(tiny_onnx) as srv:
        batcher = _slow(srv, 0.6)

        def request():
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                result["r"] = c.post(URL, json=_json(x))

        t = threading.Thread(target=request)
        t.start()
        deadline = time.monotonic() + 10
        while not batcher.running_batch and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.running_batch == 2
        srv.server.should_exit = True  # what SIGTERM does
        t.join(timeout=20)
        srv.thread.join(timeout=20)
        assert not srv.thread.is_alive()
        r = result["r"]
        assert r.status_code == 200
        y = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(2, 10)
        np.testing.assert_allclose(y, offline(tiny_onnx, x), rtol=1e-5, atol=1e-6)
        assert not batcher.ready
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/v2/health/live", timeout=2)


def test_a_failing_model_call_is_a_logged_500_and_the_server_goes_on(serve_model, tiny_onnx):
    x = _json(np.zeros((1, 1, 8, 8), np.float32))
    with serve_model(tiny_onnx) as srv, httpx.Client(base_url=srv.url) as c:
        batcher = srv.app.state.batcher

        def broken(_):
            raise RuntimeError("boom")

        batcher.run_fn = broken
        r = c.post(URL, json=x)
        assert r.status_code == 500
        assert r.json()["error"] == "inference failed: RuntimeError: boom"
        batcher.run_fn = srv.app.state.model.run
        assert c.post(URL, json=x).status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
