"""kdtool serve: bearer-token auth and the request body limit."""

from __future__ import annotations

import gzip

import httpx
import numpy as np
import pytest

URL = "/v2/models/tiny/infer"
X = np.zeros((1, 1, 8, 8), np.float32)
BODY = {
    "inputs": [
        {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": X.ravel().tolist()}
    ]
}


def test_api_key_guards_all_but_health(serve_model, tiny_onnx):
    good = {"Authorization": "Bearer s3cret"}
    with serve_model(tiny_onnx, api_key="s3cret") as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/v2/health/live").status_code == 200  # probes need no key
        assert c.get("/v2/health/ready").status_code == 200
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret"},
            {"Authorization": "Basic s3cret"},
        ):
            for method, path in (
                ("GET", "/v2"),
                ("GET", "/v2/models/tiny"),
                ("POST", URL),
                ("GET", "/metrics"),
            ):
                r = c.request(
                    method, path, json=BODY if method == "POST" else None, headers=headers
                )
                assert r.status_code == 401, (headers, path)
                assert r.headers["www-authenticate"] == "Bearer"
                assert "Authorization: Bearer" in r.json()["error"]
        assert c.post(URL, json=BODY, headers=good).status_code == 200
        assert c.get("/metrics", headers=good).status_code == 200

        import tritonclient.http as triton

        client = triton.InferenceServerClient(srv.host_port)
        try:
            inp = triton.InferInput("input", [1, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(X)
            assert client.infer("tiny", [inp], headers=good).as_numpy("logits").shape == (1, 10)
            with pytest.raises(Exception, match="API key"):
                client.infer("tiny", [inp])
        finally:
            client.close()


def test_body_limit_gives_413(serve_model, tiny_onnx):
    with serve_model(tiny_onnx, max_body_mb=0.01) as srv, httpx.Client(base_url=srv.url) as c:
        big = b"x" * 20_000
        r = c.post(URL, content=big)
        assert r.status_code == 413 and "--max-body-mb" in r.json()["error"]

        def chunks():  # no Content-Length: the limit applies while reading
            for _ in range(20):
                yield b" " * 1000

        r = c.post(URL, content=chunks())
        assert r.status_code == 413 and "over the 0.01 MB limit" in r.json()["error"]
        r = c.post("/v2/models/tiny/classify", content=big, headers={"Content-Type": "image/png"})
        assert r.status_code == 413
        bomb = gzip.compress(big)  # 20 kB of x in 60 bytes: over the limit once decompressed
        for route in (URL, "/v2/models/tiny/classify"):
            r = c.post(route, content=bomb, headers={"Content-Encoding": "gzip"})
            assert r.status_code == 413, (route, r.text)
            assert "decompressed request body is over" in r.json()["error"]
        assert c.post(URL, json=BODY).status_code == 200  # small requests still served
