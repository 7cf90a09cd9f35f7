"""Reduced-precision ONNX graphs: FP16 by conversion, INT8 by static QDQ quantisation.

Both keep a float32 input and output, so a client feeds every precision the same way.

INT8 is static post-training quantisation with ``onnxruntime.quantization`` in QDQ
format: weights per channel and symmetric, activations symmetric int8 (zero point 0)
by default. Symmetric int8 is the only form TensorRT's explicit quantisation takes, so
the same file builds a TensorRT INT8 engine (``--trt``). ONNX Runtime's CPU provider runs
it fast and exactly only once it is re-encoded as uint8 (``kdtool.export.cpu_int8``), which
kdtool's sessions do at load (``kdtool.export.ort_session``); a plain onnxruntime session
runs most of its convolutions in float, and on x86 without VNNI the rest can be wrong.
``activations="asymmetric"`` (uint8 with zero points, CPU only: TensorRT refuses it) uses
the full uint8 range after a ReLU. docs/BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from kdtool.errors import KdtoolError, check_choice

CALIB_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_MODES = ("symmetric", "asymmetric")


def to_fp16(model):
    """An FP16 copy of an FP32 ``onnx.ModelProto``; input and output stay float32 (Cast nodes).

    onnxruntime's converter clamps weights to the fp16 range and keeps ops that have no
    fp16 form in fp32; TensorRT 11 takes the FP16 precision from this graph.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        return convert_float_to_float16(model, keep_io_types=True)


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calib: np.ndarray,
    *,
    input_name: str,
    batch_size: int,
    method: str = "minmax",
    activations: str = "symmetric",
    static: bool = False,
    progress=None,
) -> dict:
    """Write the static INT8 QDQ model of ``fp32_path`` to ``out_path``; return its record.

    ``calib`` holds normalised float32 NCHW calibration images, fed in batches of
    ``batch_size``; for a ``static`` graph that is its batch and a last short batch is
    dropped (padding would skew the ranges). ``progress(n)`` is called per batch.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    check_choice(method, CALIB_METHODS, "calibration method")
    check_choice(activations, ACTIVATION_MODES, "INT8 activation mode")
    batches = [calib[i : i + batch_size] for i in range(0, len(calib), batch_size)]
    if static:  # a fixed-batch graph takes only full batches
        batches = [b for b in batches if len(b) == batch_size]
    if not batches:
        raise KdtoolError(
            f"{len(calib)} calibration images cannot fill one batch of {batch_size}",
            "give more --calib-data images or a smaller --batch",
        )
    # Pre-processing (shape inference + ORT's graph optimiser) fuses Conv+BN and gives
    # every tensor a shape, which the quantiser needs to place Q/DQ nodes.
    pre_path = out_path.with_name(out_path.stem + ".pre.onnx")
    with _quiet():
        quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=False)
    symmetric = activations == "symmetric"
    try:
        ranges = _activation_ranges(pre_path, batches, input_name, method, symmetric, progress)
        with _quiet():
            quantize_static(
                str(pre_path),
                str(out_path),
                # The ranges are all set below: its own calibration pass needs one batch.
                _Batches(input_name, batches[:1]),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                extra_options={
                    "ActivationSymmetric": symmetric,
                    "WeightSymmetric": True,
                    "TensorQuantOverrides": ranges,
                },
            )
    finally:
        pre_path.unlink(missing_ok=True)
        pre_path.with_name(pre_path.stem + ".augmented.onnx").unlink(missing_ok=True)
    return {
        "format": "QDQ",
        "weights": "int8 per-channel symmetric",
        "activations": "int8 symmetric" if symmetric else "uint8 asymmetric",
        "tensorrt_compatible": symmetric,
        "calib_method": method,
        "calib_images": sum(len(b) for b in batches),
    }


ENTROPY_BINS, ENTROPY_QUANTIZED_BINS = 2048, 128
PERCENTILE = 99.999


class _Batches:
    """An ONNX Runtime calibration data reader over ``batches`` (CalibrationDataReader's
    protocol: get_next until None, rewind)."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.input_name, self.batches, self._at = input_name, batches, 0

    def get_next(self):
        if self._at == len(self.batches):
            return None
        self._at += 1
        return {self.input_name: np.ascontiguousarray(self.batches[self._at - 1], np.float32)}

    def rewind(self):
        self._at = 0


def _activation_ranges(pre_path: Path, batches: list[np.ndarray], input_name: str,
                       method: str, symmetric: bool, progress) -> dict[str, list[dict]]:
    """Each calibrated tensor's (rmin, rmax) by ``method``, as ``TensorQuantOverrides``.

    The calibrator is fed one batch at a time and merges as it goes (min/max exactly, the
    histograms by re-binning), so memory holds one batch's activations, not every batch's
    as quantize_static's own pass does (4.5 GB for 200 images of a 96-px MobileNetV3), and
    batches of different sizes mix (its histograms stacked them into one array). The
    options are quantize_static's own, except entropy's histogram: its default (128 bins
    for 128 quantised bins) leaves one candidate threshold, the full range, so kdtool
    searches 2,048 bins (TensorRT's and PyTorch's; about 0.5 s per tensor on 2 cores).
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    from kdtool import console

    kind, options = {
        "minmax": (CalibrationMethod.MinMax, {}),
        "percentile": (CalibrationMethod.Percentile, {"percentile": PERCENTILE}),
        "entropy": (CalibrationMethod.Entropy, {
            "num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS,
            "symmetric": symmetric}),
    }[method]
    # the op types quantize_static calibrates by default, so the same tensors get ranges
    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    with _quiet():
        calibrator = create_calibrator(
            pre_path, ops,
            augmented_model_path=str(pre_path.with_name(pre_path.stem + ".augmented.onnx")),
            calibrate_method=kind, extra_options=options)
        for batch in batches:
            calibrator.collect_data(_Batches(input_name, [batch]))
            if progress is not None:
                progress(1)
    if method == "entropy":
        console.info(f"entropy calibration: searching each activation's threshold over "
                     f"{ENTROPY_BINS:,} bins (about 0.5 s per tensor on 2 cores)")
    with _quiet():
        ranges = calibrator.compute_data()
    found = {name: tuple(td.range_value) for name, td in ranges.items()}
    _adjust_as_the_quantizer_does(pre_path, found)
    # numpy scalars: the quantiser reads their dtype
    return {name: [{"rmin": np.asarray(lo, np.float32), "rmax": np.asarray(hi, np.float32)}]
            for name, (lo, hi) in found.items()}


def _adjust_as_the_quantizer_does(pre_path: Path, ranges: dict[str, tuple]) -> None:
    """ONNX Runtime's quantiser gives the input of a Relu or Clip that nothing else reads
    its output's range (the activation fuses into the layer before it), and a Softmax's
    output [0, 1]; overrides bypass that, so they carry it themselves (for minmax the
    file is then byte for byte what quantize_static's own calibration writes)."""
    import onnx

    graph = onnx.load(str(pre_path), load_external_data=False).graph
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for node in graph.node:
        if node.op_type in ("Relu", "Clip"):
            src, dst = node.input[0], node.output[0]
            if readers.get(src) == 1 and src in ranges and dst in ranges:
                ranges[src] = ranges[dst]
        elif node.op_type == "Softmax" and node.output[0] in ranges:
            ranges[node.output[0]] = (0.0, 1.0)


def quant_zero_points(model) -> dict[str, np.ndarray]:
    """Every zero point of the QuantizeLinear/DequantizeLinear nodes of an ``onnx.ModelProto``."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consts = {
        n.output[0]: a.t
        for n in model.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    }
    zps = {}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            t = inits.get(n.input[2]) or consts.get(n.input[2])
            if t is not None:
                zps[n.input[2]] = numpy_helper.to_array(t)
    return zps


def fold_bias_dequantize(model) -> int:
    """Replace DequantizeLinear of constant int32 biases by float constants, in place.

    ORT writes int32 biases behind a DequantizeLinear; TensorRT's explicit quantisation
    quantises inputs and weights only, so the engine build gets the bias in float (the
    arithmetic is identical: bias_float = (q - zero_point) * scale). Returns the count.
    """
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    folded = []
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        q = inits[n.input[0]]
        if q.data_type != TensorProto.INT32 or n.input[1] not in inits:
            continue
        x = numpy_helper.to_array(q).astype(np.float64)
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] else 0
        value = ((x - zp) * scale).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(value, n.output[0]))
        folded.append(n)
    for n in folded:
        model.graph.node.remove(n)
    # Initializers only the removed nodes read are dropped to keep the file clean.
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return len(folded)


@contextlib.contextmanager
def _quiet():
    """Silence the prints of onnxruntime's tools on stdout (``--json`` must stay one object)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
