"""kdtool serve: the Open Inference Protocol (KServe v2) REST API, JSON and binary."""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest


def _infer_body(x: np.ndarray, name: str = "input", datatype: str = "FP32", **extra) -> dict:
    t = {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}
    return {"inputs": [t], **extra}


def test_health_and_metadata(serve_model, tiny_onnx):
    with serve_model(tiny_onnx, name="digits") as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        meta = c.get("/v2").json()
        assert meta["name"] == "kdtool" and "binary_tensor_data" in meta["extensions"]
        m = c.get("/v2/models/digits").json()
        assert m["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        assert m["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        assert m["kdtool"]["mean"] == [0.5] and m["kdtool"]["class_names"][3] == "class_3"
        # what a client of /infer needs to resize as /classify does
        assert (m["kdtool"]["resize"], m["kdtool"]["interpolation"]) == ("stretch", "bilinear")
        assert c.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
        assert c.get("/v2/models/digits/versions/1").json() == m
        r = c.get("/v2/models/tiny")
        assert r.status_code == 404 and "this server serves 'digits'" in r.json()["error"]
        r = c.get("/v2/models/digits/versions/2/ready")
        assert r.status_code == 404 and "no version '2'" in r.json()["error"]
        r = c.get("/v2/models/digits/infer")
        assert r.status_code == 405 and "Method Not Allowed" in r.json()["error"]


def test_json_infer_matches_offline_and_splits_large_batches(serve_model, tiny_onnx, offline):
    rng = np.random.default_rng(0)
    with serve_model(tiny_onnx, max_batch=4) as srv, httpx.Client(base_url=srv.url) as c:
        for n in (1, 3, 11):  # 11 > max_batch: three ORT calls, concatenated back in order
            x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
            r = c.post("/v2/models/tiny/infer", json=_infer_body(x, id=f"req-{n}"))
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["id"] == f"req-{n}" and body["model_name"] == "tiny"
            (out,) = body["outputs"]
            assert out["name"] == "logits" and out["shape"] == [n, 10]
            y = np.asarray(out["data"], np.float32).reshape(n, 10)
            np.testing.assert_allclose(y, offline(tiny_onnx, x), rtol=1e-5, atol=1e-6)
        # nested data (by shape) is accepted as well as flat
        body = {
            "inputs": [
                {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": x[:1].tolist()}
            ]
        }
        y = np.asarray(c.post("/v2/models/tiny/infer", json=body).json()["outputs"][0]["data"])
        np.testing.assert_allclose(y, offline(tiny_onnx, x[:1])[0], rtol=1e-5, atol=1e-6)
        # an empty 'outputs' names none: all of them, as Triton answers it
        (out,) = c.post("/v2/models/tiny/infer", json={**body, "outputs": []}).json()["outputs"]
        assert out["name"] == "logits" and out["shape"] == [1, 10]


def test_static_batch_model_is_padded(serve_model, static_onnx, offline):
    x = np.random.default_rng(1).standard_normal((6, 1, 8, 8)).astype(np.float32)
    with serve_model(static_onnx, max_batch=32) as srv, httpx.Client(base_url=srv.url) as c:
        meta = c.get("/v2/models/static4").json()
        assert meta["kdtool"]["fixed_batch"] == 4
        r = c.post("/v2/models/static4/infer", json=_infer_body(x))  # 4 + (2 padded to 4)
        y = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(6, 10)
    np.testing.assert_allclose(y, offline(static_onnx, x), rtol=1e-5, atol=1e-6)


def test_tritonclient_json_binary_and_classification(serve_model, tiny_onnx, offline):
    import tritonclient.http as triton

    x = np.random.default_rng(2).standard_normal((5, 1, 8, 8)).astype(np.float32)
    expected = offline(tiny_onnx, x)
    with serve_model(tiny_onnx, max_batch=8) as srv:
        client = triton.InferenceServerClient(srv.host_port)
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.is_model_ready("tiny")
            assert client.get_model_metadata("tiny")["inputs"][0]["shape"] == [-1, 1, 8, 8]
            assert "classification" in client.get_server_metadata()["extensions"]
            for binary_in in (False, True):
                for binary_out in (False, True):
                    inp = triton.InferInput("input", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x, binary_data=binary_in)
                    out = triton.InferRequestedOutput("logits", binary_data=binary_out)
                    result = client.infer("tiny", [inp], outputs=[out], request_id="t1")
                    np.testing.assert_allclose(
                        result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6
                    )
            # no outputs named: tritonclient asks for binary_data_output
            inp = triton.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            got = client.infer("tiny", [inp]).as_numpy("logits")
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            for binary_out in (False, True):
                out = triton.InferRequestedOutput("logits", binary_data=binary_out, class_count=3)
                top = client.infer("tiny", [inp], outputs=[out]).as_numpy("logits")
                assert top.shape == (5, 3)
                first = top[0, 0].decode() if isinstance(top[0, 0], bytes) else top[0, 0]
                score, index, label = first.split(":")
                best = int(np.argmax(expected[0]))
                assert (int(index), label) == (best, f"class_{best}")
                assert float(score) == pytest.approx(expected[0, best], abs=1e-5)
            with pytest.raises(Exception, match="unknown input 'x'"):
                bad = triton.InferInput("x", list(x.shape), "FP32")
                bad.set_data_from_numpy(x)
                client.infer("tiny", [bad])
        finally:
            client.close()


def _binary(x: np.ndarray, header: dict | None = None, extra: bytes = b""):
    header = header or {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": x.nbytes},
            }
        ]
    }
    js = json.dumps(header).encode()
    return js + x.tobytes() + extra, {"Inference-Header-Content-Length": str(len(js))}


GOOD = np.zeros((1, 1, 8, 8), np.float32)
NAN = GOOD.copy()
NAN[0, 0, 1, 2] = np.nan
NESTED_FALSE = np.ones((1, 1, 8, 8)).tolist()  # 1s, where a false hides from np.array
NESTED_FALSE[0][0][5][3] = False
BAD_REQUESTS = {
    "malformed JSON": (b'{"inputs": [', {}, "not valid JSON"),
    "not an object": (b"[1, 2]", {}, "JSON object with 'inputs'"),
    "no inputs": (b'{"inputs": []}', {}, "non-empty list"),
    "wrong name": (_infer_body(GOOD, name="pixels"), {}, "unknown input 'pixels'"),
    "wrong datatype": (_infer_body(GOOD, datatype="FP64"), {}, "datatype 'FP64'"),
    "wrong shape": (_infer_body(np.zeros((1, 1, 8, 7), np.float32)), {}, "shape [1,1,8,7]"),
    "zero batch": (
        {"inputs": [{"name": "input", "shape": [0, 1, 8, 8], "datatype": "FP32", "data": []}]},
        {},
        "N >= 1",
    ),
    "too few values": (
        {
            "inputs": [
                {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 63}
            ]
        },
        {},
        "has 63 values",
    ),
    "strings": (
        {
            "inputs": [
                {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": ["a"] * 64}
            ]
        },
        {},
        "must be 64 numbers",
    ),
    "booleans": (
        {
            "inputs": [
                {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [True] * 64}
            ]
        },
        {},
        "true/false are not numbers",
    ),
    "booleans among numbers": (
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "data": [0.5, True] + [0.25] * 62,
                }
            ]
        },
        {},
        "input 'input': 'data' must be 64 numbers (flat or nested by shape): "
        "true/false are not numbers (found true at data[1])",
    ),
    "nested booleans among numbers": (
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "data": NESTED_FALSE,
                }
            ]
        },
        {},
        "found false at data[0][0][5][3]",
    ),
    "numeric strings": (
        {
            "inputs": [
                {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": ["1.5"] * 64}
            ]
        },
        {},
        "found strings",
    ),
    "null among numbers": (
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "data": [None, None] + [0.5] * 62,
                }
            ]
        },
        {},
        "2 non-finite",
    ),
    "ragged": (
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "data": [[0.0] * 60, [0.0] * 4, 1],
                }
            ]
        },
        {},
        "must be 64 numbers (flat or nested by shape): nested lists of different lengths",
    ),
    "overflow to inf": (
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "data": [1e39] + [0.0] * 63,
                }
            ]
        },
        {},
        "1 non-finite",
    ),
    "null is NaN": (
        {
            "inputs": [
                {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [None] * 64}
            ]
        },
        {},
        "64 non-finite values (NaN, infinity or JSON null)",
    ),
    "binary NaN": (*_binary(NAN), "non-finite"),
    "binary size mismatch": (_binary(GOOD)[0][:-4], _binary(GOOD)[1], "needs 256 bytes"),
    "binary trailing bytes": (*_binary(GOOD, extra=b"xx"), "2 bytes after"),
    "bad header length": (
        _binary(GOOD)[0],
        {"Inference-Header-Content-Length": "99999"},
        "outside the",
    ),
    "unknown output": (
        _infer_body(GOOD, outputs=[{"name": "probs"}]),
        {},
        "unknown output 'probs'",
    ),
    "bad binary flag": (
        _infer_body(GOOD, parameters={"binary_data_output": "yes"}),
        {},
        "binary_data_output",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_400_saying_what(tiny_server, case):
    body, headers, message = BAD_REQUESTS[case]
    with httpx.Client(base_url=tiny_server.url) as c:
        if isinstance(body, dict):
            r = c.post("/v2/models/tiny/infer", json=body, headers=headers)
        else:
            r = c.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]
        assert c.post("/v2/models/tiny/infer", json=_infer_body(GOOD)).status_code == 200


def test_binary_bytes_output_layout(tiny_server, tiny_onnx, offline):
    """Raw response: JSON header of the announced length, then little-endian FP32 rows."""
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)
    body, headers = _binary(
        x,
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [2, 1, 8, 8],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        },
    )
    with httpx.Client(base_url=tiny_server.url) as c:
        r = c.post("/v2/models/tiny/infer", content=body, headers=headers)
    n = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:n])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 80
    y = np.array(struct.unpack("<20f", r.content[n:])).reshape(2, 10)
    np.testing.assert_allclose(y, offline(tiny_onnx, x), rtol=1e-5, atol=1e-6)


def test_compressed_requests_and_responses(tiny_server, tiny_onnx, offline):
    """tritonclient's request/response compression (gzip and deflate), as Triton does it."""
    import gzip

    import tritonclient.http as triton

    x = np.random.default_rng(5).standard_normal((40, 1, 8, 8)).astype(np.float32)
    expected = offline(tiny_onnx, x)
    client = triton.InferenceServerClient(tiny_server.host_port)
    try:
        for algorithm in ("gzip", "deflate"):
            for binary in (False, True):
                inp = triton.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                out = triton.InferRequestedOutput("logits", binary_data=binary)
                result = client.infer(
                    "tiny",
                    [inp],
                    outputs=[out],
                    request_compression_algorithm=algorithm,
                    response_compression_algorithm=algorithm,
                )
                np.testing.assert_allclose(
                    result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6
                )
    finally:
        client.close()
    body = json.dumps(_infer_body(x[:1])).encode()
    with httpx.Client(base_url=tiny_server.url) as c:
        r = c.post(
            "/v2/models/tiny/infer", json=_infer_body(x), headers={"Accept-Encoding": "gzip"}
        )
        assert r.headers["content-encoding"] == "gzip"  # httpx decompressed it
        y = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(40, 10)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
        small = c.post("/v2/models/tiny/infer", content=body, headers={"Accept-Encoding": "gzip"})
        assert "content-encoding" not in small.headers  # not worth it under 1 KB
        r = c.post("/v2/models/tiny/infer", content=body, headers={"Content-Encoding": "br"})
        assert r.status_code == 415 and "use gzip or deflate" in r.json()["error"]
        truncated = gzip.compress(body)[:-20]
        r = c.post("/v2/models/tiny/infer", content=truncated, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and "truncated" in r.json()["error"]
        r = c.post("/v2/models/tiny/infer", content=b"xx", headers={"Content-Encoding": "gzip"})
        assert r.status_code == 400 and "does not decompress" in r.json()["error"]


def test_an_int8_model_is_served_the_way_kdtool_runs_it_on_cpu(tiny_onnx, tmp_path):
    # The served session is opened like every kdtool runner: a symmetric INT8 graph runs
    # with uint8 activations on the CPU provider (kdtool.export.ort_session).
    import onnx

    from kdtool.deploy.server import OnnxModel
    from kdtool.export.metadata import read_info, write_info
    from kdtool.export.precision import quantize_int8
    from kdtool.export.runners import OrtRunner

    calib = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    path = tmp_path / "tiny.int8.onnx"
    quantize_int8(tiny_onnx, path, calib, input_name="input", batch_size=16)
    proto = onnx.load(str(path))
    info = read_info(tiny_onnx)
    info.precision = "int8"
    write_info(proto, info)
    onnx.save(proto, str(path))

    model = OnnxModel(path, threads=1)
    assert model.opened.uint8_tensors > 0
    x = calib[:5]
    with OrtRunner(path, threads=1) as runner:
        np.testing.assert_array_equal(model.run(x), runner.infer(x))


def test_json_booleans_are_refused_among_numbers():
    """np.array reads true/false among numbers as 1/0: found and named, flat or nested."""
    from kdtool.deploy.server.protocol import RequestError, _json_numbers

    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    rows = np.random.default_rng(0).standard_normal((2, 3, 4)).tolist()
    rows[1][2][3] = True
    for data, dtype, count, found in [
        ([0.5, True, 2.0], f32, 3, "true at data[1]"),
        ([1.0, 0.0, False], f32, 3, "false at data[2]"),
        ([3, 1, True], i64, 3, "true at data[2]"),
        ([[0.0, 1.0], [True, 2.0]], f32, 4, "true at data[1][0]"),
        (rows, f32, 24, "true at data[1][2][3]"),
        ([None, 0.5, True], f32, 3, "true at data[2]"),  # null: numpy's object path
        ([2**70, False], f32, 2, "false at data[1]"),  # past int64: the object path too
        ([[False, True]], f32, 2, "false at data[0][0]"),  # all booleans
    ]:
        with pytest.raises(RequestError) as e:
            _json_numbers(data, dtype, "pixels", count)
        assert e.value.status == 400
        assert e.value.message == (
            f"input 'pixels': 'data' must be {count} numbers (flat or nested by shape): "
            f"true/false are not numbers (found {found})"
        )
    # 0 and 1 as numbers (where booleans would hide) are numbers
    ones = _json_numbers([[1.0, 0.0], [1, 0], [-0.0, 0.5]], f32, "x", 6)
    np.testing.assert_array_equal(ones, [[1, 0], [1, 0], [0, 0.5]])
    np.testing.assert_array_equal(_json_numbers([0, 1, 2], i64, "x", 3), [0, 1, 2])
    few = [[0.5] * 7 + [1.0], [0.25] * 8]  # few 0/1s: looked at one by one
    np.testing.assert_array_equal(_json_numbers(few, f32, "x", 16), few)
    assert _json_numbers([], f32, "x", 0).size == 0


def test_json_integers_are_checked_against_the_input_type():
    """A foreign ONNX may take integer inputs: fractions and out-of-range values are refused."""
    from kdtool.deploy.server.protocol import RequestError, _json_numbers

    u8 = np.dtype(np.uint8)
    np.testing.assert_array_equal(_json_numbers([0, 255, 7], u8, "x", 3), [0, 255, 7])
    assert _json_numbers([0, 255, 7], u8, "x", 3).dtype == np.uint8
    for data, message in [
        ([0, 256, 1], "holds 0..255"),
        ([-1, 0, 1], "holds 0..255"),
        ([0.5, 1, 2], "whole numbers"),
        ([None, 1, 2], "whole numbers"),
        ([True, False, True], "true/false"),
    ]:
        with pytest.raises(RequestError, match=message):
            _json_numbers(data, u8, "x", 3)
    big = _json_numbers([2**70, 1], np.dtype(np.float32), "x", 2)  # past int64: still a number
    assert big.dtype == np.float32 and big[0] == np.float32(2**70)
