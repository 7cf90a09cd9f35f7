"""``kdtool serve`` on the command line: errors, the start-up banner and SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper


def test_serve_errors(cli, tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.delenv("KDTOOL_API_KEY", raising=False)
    r = cli("serve", tmp_path / "missing.onnx")
    assert r.code == 1 and "missing.onnx' does not exist" in r.err

    plain = tmp_path / "plain.onnx"
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), plain)
    r = cli("serve", plain)
    assert r.code == 1 and "plain.onnx' has no kdtool metadata" in r.err
    assert "kdtool export" in r.err

    ckpt = tmp_path / "student.safetensors"  # the usual slip: the PyTorch file
    ckpt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    r = cli("serve", ckpt)
    assert r.code == 1 and "looks like a PyTorch checkpoint" in r.err
    assert f"kdtool export {ckpt} --onnx {tmp_path / 'student.onnx'}" in r.err

    r = cli("serve", tiny_onnx, "--host", "0.0.0.0")
    assert r.code == 1 and "needs an API key" in r.err and "KDTOOL_API_KEY" in r.err

    r = cli("serve", tiny_onnx, "--provider", "cuda")
    assert r.code == 1 and "no CUDAExecutionProvider" in r.err
    r = cli("serve", tiny_onnx, "--provider", "cpuu")
    assert r.code == 1 and "did you mean 'cpu'" in r.err
    for trt in ("trt", "tensorrt", "TensorRT"):  # bench's name, and ONNX Runtime's own
        r = cli("serve", tiny_onnx, "--provider", trt)
        assert r.code == 1 and "no TensorrtExecutionProvider" in r.err, (trt, r.err)
    r = cli("serve", tiny_onnx, "--max-batch", "0")
    assert r.code == 1 and "--max-batch" in r.err

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = cli("serve", tiny_onnx, "--port", port)
    assert r.code == 1 and f"port {port} on 127.0.0.1 is already in use" in r.err


def _start(args: list[str], env: dict) -> tuple[subprocess.Popen, str, list[str]]:
    """Start ``kdtool serve`` and read its banner up to the URL line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdtool", "serve", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if m:
            return proc, m.group(1), lines
    proc.kill()
    raise AssertionError("kdtool serve did not start:\n" + "".join(lines) + proc.stderr.read())


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def test_cli_banner_auth_and_sigterm_finishes_in_flight(tiny_onnx):
    """The real command: banner with curl, env API key, SIGTERM waits for the request."""
    env = {**os.environ, "KDTOOL_API_KEY": "k3y"}
    proc, url, lines = _start(
        [
            str(tiny_onnx),
            "--port",
            "0",
            "--max-batch",
            "8",
            "--max-delay-ms",
            "30000",
            "--threads",
            "1",
        ],
        env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.05)
        banner = "".join(lines) + "".join(proc.stderr.readline() for _ in range(5))
        assert "the examples read the key from $KDTOOL_API_KEY" in banner
        assert "kdtool serve: model 'tiny' (tiny_cnn, 1x8x8 NCHW, 10 classes" in banner
        assert (
            f'curl -s -H "Authorization: Bearer $KDTOOL_API_KEY" {url}/v2/models/tiny/infer'
            in banner
        )
        assert "k3y" not in banner  # the key itself is never printed
        assert httpx.get(url + "/v2").status_code == 401

        x = np.ones((1, 1, 8, 8), np.float32)
        body = {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 1, 8, 8],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
        result = {}

        def request():
            result["r"] = httpx.post(
                url + "/v2/models/tiny/infer",
                json=body,
                timeout=30,
                headers={"Authorization": "Bearer k3y"},
            )

        t = threading.Thread(target=request)
        t.start()
        auth = {"Authorization": "Bearer k3y"}
        deadline = time.monotonic() + 20
        while "kdtool_queue_images 1.0" not in httpx.get(url + "/metrics", headers=auth).text:
            assert time.monotonic() < deadline, "the request never reached the queue"
            time.sleep(0.02)
        # it now waits (up to 30 s) in the queue for company: stop the server under it,
        # which runs it at once (no new requests come)
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=30)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t_stop < 15  # not the 30 s batching delay
        r = result["r"]
        assert r.status_code == 200 and json.loads(r.content)["outputs"][0]["shape"] == [1, 10]
        rest = proc.stderr.read()
        assert "finishing the requests in flight" in rest and "kdtool serve: stopped" in rest
    finally:
        _reap(proc)


def test_a_second_ctrl_c_stops_at_once_and_quietly(tiny_onnx):
    """The real command with a request whose body stalls: Ctrl-C waits for it (up to the
    grace), a second Ctrl-C stops at once, the request gets a 503, and no traceback."""
    proc, url, _ = _start([str(tiny_onnx), "--port", "0", "--threads", "1"], dict(os.environ))
    try:
        host, port = url.removeprefix("http://").split(":")
        s = socket.create_connection((host, int(port)), timeout=20)
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1000\r\n\r\n{")
        time.sleep(0.5)  # the request is in the app, waiting for the rest of its body
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        answer = s.recv(4096)
        s.close()
        assert proc.wait(timeout=20) == 0
        assert time.monotonic() - t_stop < 8  # not the 20 s grace
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"the server stopped before this request finished" in answer
        rest = proc.stderr.read()
        assert "kdtool serve: stopped" in rest
        assert "Traceback" not in rest and "Exception in" not in rest, rest
    finally:
        _reap(proc)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_hosts_need_no_key(host):
    from kdtool.deploy.server.run import check_exposure, is_loopback

    assert is_loopback(host)
    check_exposure(host, None)
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


@pytest.mark.parametrize("key", [" ", "abc ", " abc", "cl\u00e9", "a\tb"])
def test_an_api_key_no_client_can_send_is_refused_at_start(cli, tiny_onnx, key, monkeypatch):
    monkeypatch.setenv("KDTOOL_API_KEY", key)
    r = cli("serve", tiny_onnx, "--host", "0.0.0.0", "--port", "0")
    assert r.code == 1 and "must be printable ASCII without spaces at either end" in r.err


def test_the_banner_states_the_batch_a_static_graph_allows(static_onnx, tiny_onnx):
    from kdtool.deploy.server.app import ServerConfig
    from kdtool.deploy.server.model import OnnxModel
    from kdtool.deploy.server.run import banner

    static = OnnxModel(static_onnx, threads=1)
    text = banner(static, ServerConfig(max_batch=32), "http://127.0.0.1:8000")
    assert "batches up to 4 (the graph's static batch, below --max-batch 32" in text
    assert "batches up to 32" not in text
    dynamic = OnnxModel(tiny_onnx, threads=1)
    assert ("; batches up to 32 of the requests that queue while one runs"
            in banner(dynamic, ServerConfig(), "http://h:1"))
    assert "; batches up to 32 within 5 ms" in banner(dynamic, ServerConfig(max_delay_ms=5), "u")
    assert "no batching (--max-batch 1)" in banner(dynamic, ServerConfig(max_batch=1), "u")


def test_no_memory_arena_reaches_the_session_and_the_model_metadata(cli, tiny_onnx,
                                                                    monkeypatch):
    from kdtool.deploy import server
    from kdtool.deploy.server.model import OnnxModel

    for arena in (True, False):
        model = OnnxModel(tiny_onnx, threads=1, memory_arena=arena)
        assert model.session.get_session_options().enable_cpu_mem_arena is arena
        assert model.describe()["memory_arena"] is arena
    got = {}
    monkeypatch.setattr(server, "serve", lambda path, **kw: got.update(kw))
    assert cli("serve", tiny_onnx, "--no-memory-arena").code == 0
    assert got["memory_arena"] is False
    assert cli("serve", tiny_onnx).code == 0 and got["memory_arena"] is True


def test_model_names_are_url_safe(tiny_onnx, tmp_path):
    """Only '/' was refused: 'my model.onnx' served under a name that broke its URLs."""
    import shutil

    from kdtool.deploy.server.model import OnnxModel
    from kdtool.errors import KdtoolError

    spaced = tmp_path / "my model#2.onnx"
    shutil.copy(tiny_onnx, spaced)
    assert OnnxModel(spaced, threads=1, warmup=False).name == "my_model_2"  # from the file
    for name in ("a b", "a#b", "x/y", ""):
        with pytest.raises(KdtoolError, match="cannot be part of a URL path"):
            OnnxModel(tiny_onnx, name=name, threads=1, warmup=False)
    assert OnnxModel(tiny_onnx, name="digits-v1.2_b", threads=1, warmup=False).name == \
        "digits-v1.2_b"


def test_workers_share_the_cores_unless_threads_are_given(monkeypatch, capsys):
    from kdtool import runinfo
    from kdtool.deploy.serve_cli import threads_per_worker

    monkeypatch.setattr(runinfo, "usable_cores", lambda: 8)
    assert threads_per_worker(1, 0, "cpu") == 0  # one worker: ONNX Runtime's own default
    assert threads_per_worker(4, 0, "cpu") == 2
    assert "--workers 4 on 8 cores: --threads 2 each" in capsys.readouterr().err
    assert threads_per_worker(16, 0, "cpu") == 1
    assert threads_per_worker(4, 2, "cpu") == 2 and capsys.readouterr().err.count("warn") == 0
    assert threads_per_worker(4, 4, "cpu") == 4  # given: kept, and the oversubscription said
    assert "16 threads on 8 cores" in capsys.readouterr().err
    assert threads_per_worker(4, 0, "cuda") == 0  # the GPU's workers do not share the cores
