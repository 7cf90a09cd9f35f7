"""Fixtures for the deploy tests: small kdtool ONNX files, and servers on loopback."""

from __future__ import annotations

import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kdtool.export.metadata import OnnxInfo, write_info
from kdtool.models import create_model


def _info(in_chans, size, num_classes, layout, batch, class_names, arch) -> OnnxInfo:
    return OnnxInfo(
        input_name="input",
        output_name="logits",
        in_chans=in_chans,
        input_size=[size, size],
        mean=[0.5] * in_chans,
        std=[0.25] * in_chans,
        num_classes=num_classes,
        class_names=class_names or [f"class_{i}" for i in range(num_classes)],
        layout=layout,
        batch=batch,
        arch=arch,
    )


def export_zoo_onnx(
    path: Path, *, in_chans: int = 1, size: int = 8, num_classes: int = 10, seed: int = 0
) -> Path:
    """A random-weight zoo tiny_cnn exported by torch.onnx (dynamic batch) + kdtool metadata.

    The TorchScript exporter: for this plain CNN the graph is the dynamo exporter's, and it
    exports in 0.1 s instead of several seconds on 2 cores.
    """
    torch.manual_seed(seed)
    net = create_model("tiny_cnn", num_classes=num_classes, in_chans=in_chans).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that outputs differ per input
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, in_chans, size, size)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (x,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            dynamo=False,
        )
    proto = onnx.load(str(path))
    write_info(proto, _info(in_chans, size, num_classes, "NCHW", None, None, "tiny_cnn"))
    onnx.save(proto, str(path))
    return path


def make_graph_onnx(
    path: Path,
    *,
    in_chans: int,
    size: int,
    num_classes: int,
    layout: str = "NCHW",
    batch: int | None = None,
    seed: int = 0,
    class_names: list[str] | None = None,
) -> Path:
    """A conv-relu-pool-linear graph written directly with onnx.helper (milliseconds)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = [
        rng.standard_normal(s).astype(np.float32) * 0.5
        for s in ((8, in_chans, 3, 3), (8,), (num_classes, 8), (num_classes,))
    ]
    inits = [
        numpy_helper.from_array(a, n) for a, n in zip(w, ("cw", "cb", "fw", "fb"), strict=True)
    ]
    n = batch or "N"
    shape = [n, in_chans, size, size] if layout == "NCHW" else [n, size, size, in_chans]
    nodes = (
        [helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2])]
        if layout == "NHWC"
        else []
    )
    nodes += [
        helper.make_node(
            "Conv", ["nchw" if nodes else "input", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, num_classes])],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    write_info(proto, _info(in_chans, size, num_classes, layout, batch, class_names, "graph"))
    onnx.save(proto, str(path))
    return path


@pytest.fixture
def graph_onnx(tmp_path):
    """``graph_onnx(name, **kwargs)``: a make_graph_onnx model in this test's folder."""
    return lambda name, **kwargs: make_graph_onnx(tmp_path / name, **kwargs)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """The zoo's tiny_cnn, 1x8x8 grey input (digits-sized), NCHW, dynamic batch, 10 classes."""
    return export_zoo_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="session")
def rgb_nhwc_onnx(tmp_path_factory) -> Path:
    """A 16x16 RGB graph in NHWC layout with 5 named classes."""
    return make_graph_onnx(
        tmp_path_factory.mktemp("onnx") / "rgb.onnx",
        in_chans=3,
        size=16,
        num_classes=5,
        layout="NHWC",
        seed=1,
        class_names=["cat", "dog", "fox", "owl", "yak"],
    )


@pytest.fixture(scope="session")
def static_onnx(tmp_path_factory) -> Path:
    """A 1x8x8 graph with a static batch dimension of 4."""
    return make_graph_onnx(
        tmp_path_factory.mktemp("onnx") / "static4.onnx",
        in_chans=1,
        size=8,
        num_classes=10,
        batch=4,
        seed=2,
    )


def _offline(path: Path, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's answer outside the server, one row at a time (no batching effects)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    static = sess.get_inputs()[0].shape[0]
    rows = []
    for row in x:
        batch = row[None] if not isinstance(static, int) else np.repeat(row[None], static, 0)
        rows.append(sess.run(None, {"input": batch})[0][0])
    return np.stack(rows)


@pytest.fixture
def offline():
    """``offline(onnx_path, x)``: the reference outputs, from a separate ORT session."""
    return _offline


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    app: object
    server: object
    thread: threading.Thread

    @property
    def host_port(self) -> str:  # what tritonclient takes
        return self.url.removeprefix("http://")


@contextmanager
def running_server(
    model_path: Path, *, name: str | None = None, api_key: str | None = None, **config
):
    """``kdtool serve``'s app on uvicorn in a background thread, on a free loopback port."""
    from kdtool.deploy.server import OnnxModel, ServerConfig, create_app
    from kdtool.deploy.server.run import base_url, bind, uvicorn_server

    model = OnnxModel(model_path, name=name, threads=1)
    app = create_app(model, ServerConfig(api_key=api_key, **config))
    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app)  # serve's own settings: the guard, the grace, ...
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield Running(base_url("127.0.0.1", sock), app, server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.fixture(scope="session")
def serve_model():
    """``with serve_model(path, max_batch=8) as srv: srv.url ...``"""
    return running_server


@pytest.fixture(scope="session")
def tiny_server(tiny_onnx):
    """One server on tiny_onnx with the default settings, shared by the tests that only read."""
    with running_server(tiny_onnx) as srv:
        yield srv
