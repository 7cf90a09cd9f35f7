"""How kdtool's sessions run an INT8 QDQ graph on ONNX Runtime's CPU provider: fast and exact.

Two re-encodings, both exact (``q + 128`` with ``zero_point + 128`` is the same grid, so
every dequantised value and every saturation is unchanged), applied to the graph in memory
at load; the file on disk stays the symmetric int8 form TensorRT builds:

* activations (``int8_activations_to_uint8``), always: ONNX Runtime's fast CPU kernels take
  uint8 activations, and its own int8-to-uint8 pass skips a tensor with several consumers
  (a ResNet block's input), leaving those convolutions in float.
* weights (``int8_weights_to_uint8``), only where ``int8_weights_exact()`` finds that this
  CPU's int8-weight kernels are wrong. On x86 without VNNI (AVX2 or AVX-512 alone),
  ONNX Runtime multiplies uint8 x int8 with an instruction that sums pairs of products in
  16 bits and saturates, so a convolution whose activations and weights are both large
  comes out wrong (ONNX Runtime's docs advise 7-bit weights there). Its uint8 x uint8
  kernels widen first and are exact. The probe asks the running ONNX Runtime on this CPU
  instead of guessing from CPU flags.
"""

from __future__ import annotations

import functools

import numpy as np


def int8_activations_to_uint8(model) -> int:
    """Re-encode int8 activation Q/DQ pairs as uint8, in place; return how many tensors.

    Every Q whose output feeds only DequantizeLinear nodes (and is no graph output) is
    re-encoded together with those DQs; weights stay as they are.
    """
    from onnx import TensorProto

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in graph.output}

    count = 0
    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or len(q.input) < 3 or q.input[2] not in inits:
            continue
        if inits[q.input[2]].data_type != TensorProto.INT8:
            continue
        users = consumers.get(q.output[0], [])
        if q.output[0] in outputs or not users:
            continue
        if any(u.op_type != "DequantizeLinear" or len(u.input) < 3 for u in users):
            continue
        if any(u.input[2] not in inits for u in users):
            continue
        for node in (q, *users):
            node.input[2] = _uint8_twin(graph, inits, node.input[2])
        count += 1
    if count:
        _drop_unused(graph)
        # The recorded (int8) types of the re-encoded tensors are stale.
        stale = {q.output[0] for q in graph.node if q.op_type == "QuantizeLinear"}
        infos = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(infos)
    return count


def int8_weights_to_uint8(model) -> int:
    """Re-encode the int8 initializers that DequantizeLinear nodes read (the weights) as
    uint8, in place; return how many. Int32 biases and activations are left alone."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    count = 0
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            continue
        if inits[dq.input[0]].data_type != TensorProto.INT8:
            continue
        if len(dq.input) < 3 or not dq.input[2]:
            # No zero point means int8 0: give it an explicit one of the scale's shape.
            shape = numpy_helper.to_array(inits[dq.input[1]]).shape
            name = f"{dq.input[0]}_zero_point"
            if name not in inits:
                inits[name] = numpy_helper.from_array(np.zeros(shape, np.int8), name)
                graph.initializer.append(inits[name])
            del dq.input[2:]
            dq.input.append(name)
        elif inits.get(dq.input[2]) is None or inits[dq.input[2]].data_type != TensorProto.INT8:
            continue
        dq.input[0] = _uint8_twin(graph, inits, dq.input[0])
        dq.input[2] = _uint8_twin(graph, inits, dq.input[2])
        count += 1
    if count:
        _drop_unused(graph)
    return count


@functools.cache
def int8_weights_exact() -> bool:
    """Whether ONNX Runtime's CPU provider computes int8-weight convolutions exactly here.

    A 3x3 convolution over 8 channels with the largest activations and weights, fused to
    QLinearConv, against the same graph run unfused (in float); checked for uint8 and int8
    activations. Cached for the process.
    """
    x = np.full((1, 8, 4, 4), 1.27, np.float32)
    for activation in (np.uint8, np.int8):
        model = probe_conv(activation).SerializeToString()
        fused, unfused = (cpu_session(model, fused=f).run(None, {"x": x})[0]
                          for f in (True, False))
        if not np.array_equal(fused, unfused):
            return False
    return True


def cpu_session(source, *, fused: bool = True, threads: int = 1):
    """A plain CPU-provider session of ``source`` (path or bytes), errors-only logging.
    ``fused=False`` turns graph optimisation off, so every Q/DQ pair runs as written
    around float ops: the graph's exact meaning on any CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def probe_conv(activation: type):
    """``int8_weights_exact``'s graph: x -> Q/DQ (``activation``: np.uint8 or np.int8) ->
    3x3 Conv with int8 weights of +-127 -> Q/DQ; input (1, 8, 4, 4) named "x"."""
    from onnx import TensorProto, helper, numpy_helper

    zp = 128 if activation is np.uint8 else 0
    w = np.full((2, 8, 3, 3), 127, np.int8)
    w[1] = -127
    inits = [
        numpy_helper.from_array(np.array(0.01, np.float32), "xs"),
        numpy_helper.from_array(np.array(zp, activation), "xz"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.full(2, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(2, np.int8), "wz"),
        numpy_helper.from_array(np.array(1.0, np.float32), "ys"),
        numpy_helper.from_array(np.array(zp, activation), "yz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"]),
        helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "int8_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _uint8_twin(graph, inits: dict, name: str) -> str:
    """The name of ``name``'s uint8 re-encoding (``+ 128``), made once per initializer."""
    from onnx import numpy_helper

    twin = f"{name}_uint8"
    if twin not in inits:
        values = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
        inits[twin] = numpy_helper.from_array(values.astype(np.uint8), twin)
        graph.initializer.append(inits[twin])
    return twin


def _drop_unused(graph) -> None:
    """Initializers nothing reads any more (the int8 originals) go."""
    used = {name for n in graph.node for name in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
