"""kdtool export --trt where TensorRT and a CUDA GPU are present (skipped elsewhere)."""

import json
from pathlib import Path

import numpy as np
import pytest

from kdtool.checkpoint import read_meta
from kdtool.data import load_data
from kdtool.export.parity import normalise

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_builds_matches_onnxruntime_and_has_a_sidecar(
    cli, digits_teacher, tmp_path, precision
):
    pytest.importorskip("tensorrt")
    from kdtool.export.runners import OrtRunner, TrtRunner

    cache = tmp_path / "timing.cache"
    args = [
        "export",
        digits_teacher,
        "--onnx",
        tmp_path / "t.onnx",
        "--precision",
        precision,
        "--trt",
        "--batch",
        "1:16:64",
        "--timing-cache",
        cache,
        "--val",
        "digits:test",
        "--triton-repo",
        tmp_path / "repo",
        "--json",
    ]
    if precision == "int8":
        args += ["--calib-data", "digits"]
    r = cli(*args)
    assert r.code == 0, r.err
    t = r.json()["tensorrt"]
    engine = Path(t["engine"])
    sidecar = json.loads(Path(t["sidecar"]).read_text())
    assert sidecar["precision"] == precision and sidecar["profile"]["max"] == [64, 1, 8, 8]
    assert sidecar["kdtool"]["input_name"] == "input" and sidecar["gpu"]
    assert sidecar["parity"]["passed"] and cache.is_file()
    assert (tmp_path / "repo" / "t" / "1" / "model.plan").read_bytes() == engine.read_bytes()

    meta = read_meta(digits_teacher)
    data = load_data("digits:test", image_size=tuple(meta.input_size), channels=1)
    x = normalise(data.x, meta.mean, meta.std)
    with TrtRunner(engine) as trt_runner, OrtRunner(tmp_path / "t.onnx") as ort_runner:
        assert trt_runner.batch_range == (1, 64)
        for n in (1, 37, 64):
            y = trt_runner.infer(x[:n])
            assert y.shape == (n, 10) and np.isfinite(y).all()
        a = np.concatenate([ort_runner.infer(x[i : i + 64]) for i in range(0, 360, 64)])
        b = np.concatenate([trt_runner.infer(x[i : i + 64]) for i in range(0, 360, 64)])
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95

    # A second build reuses the timing cache and refuses to overwrite without --force.
    again = cli(*args[:-1])
    assert again.code == 1 and "already exists" in again.err
