"""Symmetric INT8 on ONNX Runtime's CPU provider: the exact uint8 re-encodings at load time."""

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from kdtool.checkpoint import read_meta
from kdtool.data import load_data
from kdtool.export.cpu_int8 import (
    cpu_session,
    int8_activations_to_uint8,
    int8_weights_exact,
    int8_weights_to_uint8,
    probe_conv,
)
from kdtool.export.ort_session import open_session
from kdtool.export.parity import normalise
from kdtool.export.runners import OrtRunner


def _qdq_graph(zero_point: int) -> onnx.ModelProto:
    """x -> Q -> DQ feeding two consumers (fan-out), plus a weight DQ sharing the zero point."""
    scale = numpy_helper.from_array(np.array(0.05, np.float32), "s")
    zp = numpy_helper.from_array(np.array(zero_point, np.int8), "zp")
    w = numpy_helper.from_array(np.arange(-4, 4, dtype=np.int8), "w")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["a"]),
        helper.make_node("DequantizeLinear", ["w", "s", "zp"], ["wf"]),
        helper.make_node("Add", ["a", "wf"], ["y1"]),
        helper.make_node("Relu", ["a"], ["y2"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
        [
            helper.make_tensor_value_info("y1", TensorProto.FLOAT, [8]),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, [8]),
        ],
        [scale, zp, w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, *, fused: bool = True,
         name: str = "x") -> list[np.ndarray]:
    return cpu_session(model.SerializeToString(), fused=fused).run(None, {name: x})


def test_uint8_reencoding_keeps_every_value_and_the_saturation():
    rng = np.random.default_rng(0)
    # Values on the grid, half-way between grid points, and far beyond both ends.
    xs = [
        rng.uniform(-20, 20, 8).astype(np.float32),
        (np.arange(-4, 4) * 0.05 + 0.025).astype(np.float32),
        np.array([-1e6, -6.45, -6.4, -0.0, 0.0, 6.35, 6.4, 1e6], np.float32),
    ]
    for zero_point in (0, 3, -128, 127):
        original = _qdq_graph(zero_point)
        converted = _qdq_graph(zero_point)
        assert int8_activations_to_uint8(converted) == 1
        onnx.checker.check_model(converted, full_check=True)
        types = {t.name: t.data_type for t in converted.graph.initializer}
        # The weight keeps its int8 zero point; the activation pair reads a uint8 twin.
        assert types["zp"] == TensorProto.INT8 and types["zp_uint8"] == TensorProto.UINT8
        twin = numpy_helper.to_array(
            next(t for t in converted.graph.initializer if t.name == "zp_uint8")
        )
        assert int(twin) == zero_point + 128
        for x in xs:
            for want, got in zip(_run(original, x), _run(converted, x), strict=True):
                np.testing.assert_array_equal(got, want)


def test_uint8_weights_keep_every_value():
    rng = np.random.default_rng(1)
    x = rng.uniform(-20, 20, 8).astype(np.float32)
    for zero_point in (0, 3, -128, 127):
        original = _qdq_graph(zero_point)
        converted = _qdq_graph(zero_point)
        int8_activations_to_uint8(converted)  # both rewrites share the zero point's twin
        assert int8_weights_to_uint8(converted) == 1
        onnx.checker.check_model(converted, full_check=True)
        types = {t.name: t.data_type for t in converted.graph.initializer}
        assert types == {"s": TensorProto.FLOAT, "zp_uint8": TensorProto.UINT8,
                         "w_uint8": TensorProto.UINT8}
        for want, got in zip(_run(original, x), _run(converted, x), strict=True):
            np.testing.assert_array_equal(got, want)


def test_uint8_weights_make_a_fused_int8_convolution_exact_on_this_cpu():
    """The probe's worst case (largest activations x weights) through ONNX Runtime's fused
    QLinearConv: exact once the weights are uint8, on any CPU. Without them it is exact
    exactly when the probe says so (on x86 without VNNI it is not)."""
    x = np.full((1, 8, 4, 4), 1.27, np.float32)
    for activation in (np.uint8, np.int8):
        model = probe_conv(activation)
        want = _run(model, x, fused=False)[0]
        assert np.array_equal(_run(model, x)[0], want) == int8_weights_exact()
        assert int8_weights_to_uint8(model) == 1
        assert "QLinearConv" in _optimized_ops(model, None)
        np.testing.assert_array_equal(_run(model, x)[0], want)


def test_a_weight_without_zero_point_gets_an_explicit_uint8_one():
    """Foreign QDQ files may leave a weight's zero point out (int8 0 by the ONNX spec)."""
    x = np.full((1, 8, 4, 4), 1.27, np.float32)
    model = probe_conv(np.uint8)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w")
    del dq.input[2:]
    want = _run(model, x, fused=False)[0]
    assert int8_weights_to_uint8(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert list(dq.input) == ["w_uint8", "ws", "w_zero_point_uint8"]
    zp = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}["w_zero_point_uint8"]
    assert zp.dtype == np.uint8 and zp.shape == (2,) and np.all(zp == 128)
    np.testing.assert_array_equal(_run(model, x)[0], want)
    np.testing.assert_array_equal(_run(model, x, fused=False)[0], want)


def test_a_quantized_graph_output_or_a_non_dq_consumer_is_left_alone():
    model = _qdq_graph(0)
    model.graph.output.append(helper.make_tensor_value_info("q", TensorProto.INT8, [8]))
    assert int8_activations_to_uint8(model) == 0
    assert {t.name for t in model.graph.initializer} == {"s", "zp", "w"}


def _optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory(dir=tmp_path) as d:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_cpu_sessions_run_every_conv_of_a_symmetric_int8_resnet_in_int8(
    int8_export, tmp_path
):
    path, result = int8_export
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model = onnx.load(str(path))
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    assert convs >= 9  # resnet8: stem, 3 blocks of 2, 2 projection shortcuts
    assert int8_activations_to_uint8(model) > 0
    ops = _optimized_ops(model, tmp_path)
    assert "Conv" not in ops and ops.count("QLinearConv") == convs
    # With uint8 weights too (what this CPU gets if its int8-weight kernels err).
    assert int8_weights_to_uint8(model) >= convs
    ops = _optimized_ops(model, tmp_path)
    assert "Conv" not in ops and ops.count("QLinearConv") == convs

    # The runner applies it on the CPU provider only, says so, and leaves the file alone.
    x, _ = _digits_test(read_meta(result["checkpoint"]))
    with OrtRunner(path) as fast:
        described = fast.describe()
        got = fast.infer(x)
    plain = open_session(path, uint8_on_cpu=False)
    assert plain.uint8_tensors == 0 and "int8_activations" not in plain.describe()
    assert "same values" in described["int8_activations"]
    assert ("int8_weights" in described) != int8_weights_exact()
    # Against the graph's exact meaning (Q/DQ around float ops): integer accumulation on
    # the same grid, so rounding only.
    want = _run(onnx.load(str(path)), x, fused=False, name="input")[0]
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_float_models_open_unchanged(fp32_export):
    opened = open_session(fp32_export[0])
    assert opened.uint8_tensors == 0 and opened.providers == ["CPUExecutionProvider"]


def _digits_test(meta):
    data = load_data("digits:test", image_size=tuple(meta.input_size), channels=meta.in_chans)
    return normalise(data.x, meta.mean, meta.std), data.y.numpy()


def test_calibration_streams_one_batch_at_a_time_and_takes_any_image_count(
        fp32_export, tmp_path, monkeypatch):
    """quantize_static's calibration held every batch's activations at once (4.5 GB for 200
    images of a 96-px MobileNetV3), and its histograms stacked them into one array, which
    a short last batch made ragged (numpy's 'inhomogeneous shape', 200 images in 32s)."""
    import onnxruntime.quantization.calibrate as ort_calibrate

    from kdtool.export.precision import quantize_int8

    fed = []  # the batch sizes of each collect_data call
    real = ort_calibrate.create_calibrator

    def spying(*args, **kwargs):
        calibrator = real(*args, **kwargs)
        collect = calibrator.collect_data

        def collect_data(reader):
            batches = list(iter(reader.get_next, None))
            fed.append([len(b["input"]) for b in batches])
            reader.rewind()
            return collect(reader)

        calibrator.collect_data = collect_data
        return calibrator

    monkeypatch.setattr(ort_calibrate, "create_calibrator", spying)
    meta = read_meta(fp32_export[1]["checkpoint"])
    calib = normalise(load_data("digits", channels=meta.in_chans).x[:40], meta.mean, meta.std)
    for method in ("minmax", "percentile", "entropy"):
        fed.clear()
        out = tmp_path / f"{method}.onnx"
        record = quantize_int8(Path(fp32_export[0]), out, calib, input_name="input",
                               batch_size=32, method=method)
        assert record["calib_images"] == 40 and out.exists()
        assert fed == [[32], [8]], (method, fed)  # one batch per call: memory for one
