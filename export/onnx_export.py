"""PyTorch -> ONNX (FP32): trace, check, simplify.

The default exporter is torch's dynamo exporter (``torch.onnx.export(dynamo=True)``,
the default since torch 2.9; the TorchScript one is deprecated). On the zoo it takes
1-17 s per model on 2 CPU cores, 10-40x the TorchScript exporter's time, for graphs
that give the same outputs; export is a one-off step, so the supported exporter stays
the default and ``--exporter torchscript`` remains for models dynamo cannot trace.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import torch

from kdtool.errors import KdtoolError, check_choice, message_line
from kdtool.export.batch import BatchProfile
from kdtool.interrupts import raise_if_interrupted

DEFAULT_OPSET = 18
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
EXPORTERS = ("dynamo", "torchscript")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def check_opset(opset: int) -> int:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise KdtoolError(
            f"--opset {opset} is out of range",
            f"choose {MIN_OPSET}..{newest} (default {DEFAULT_OPSET})",
        )
    return opset


def export_onnx(
    model: torch.nn.Module,
    sample_shape: tuple[int, int, int],
    *,
    batch: BatchProfile,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    slim: bool = True,
):
    """Export ``model`` (eval, CPU, fp32) to an ``onnx.ModelProto``; return it and a record.

    The input is ``input`` (N, C, H, W) and the output ``logits`` (N, classes); N is the
    symbolic ``batch`` dimension, or ``batch.max`` when the profile is static.
    """
    check_choice(exporter, EXPORTERS, "exporter")
    check_opset(opset)
    model = model.eval().cpu().float()
    # An example batch of 2: torch.export specialises sizes 0 and 1.
    n = batch.max if batch.static else 2
    example = torch.randn(n, *sample_shape)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            proto = (
                _dynamo(model, example, batch, opset)
                if exporter == "dynamo"
                else _torchscript(model, example, batch, opset)
            )
    except KdtoolError:
        raise
    except Exception as e:  # the exporters raise many types for untraceable code
        raise_if_interrupted(e)
        first = message_line(e) or type(e).__name__
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise KdtoolError(
            f"torch.onnx ({exporter} exporter) cannot export the model: {first}",
            f"try --exporter {other}",
        ) from e
    _check(proto, "exported")
    record = {"exporter": exporter, "opset": opset, "nodes": len(proto.graph.node), "slim": None}
    if slim:
        proto, record["slim"] = _slim(proto)
        _check(proto, "simplified")
    proto.producer_name = "kdtool"
    from kdtool import __version__

    proto.producer_version = __version__
    record["nodes_final"] = len(proto.graph.node)
    record["ops"] = sorted({node.op_type for node in proto.graph.node})
    return proto, record


def _dynamo(model, example, batch: BatchProfile, opset: int):
    dynamic = None if batch.static else ({0: torch.export.Dim("batch")},)
    program = torch.onnx.export(
        model,
        (example,),
        None,
        dynamo=True,
        opset_version=opset,
        verbose=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=dynamic,
    )
    return program.model_proto


def _torchscript(model, example, batch: BatchProfile, opset: int):
    import onnx

    buffer = io.BytesIO()
    axes = None if batch.static else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    torch.onnx.export(
        model,
        (example,),
        buffer,
        dynamo=False,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes=axes,
        do_constant_folding=True,
    )
    return onnx.load_from_string(buffer.getvalue())


def _slim(proto):
    try:
        import onnxslim
    except ImportError:
        return proto, None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            slimmed = onnxslim.slim(proto)
    except Exception as e:  # a graph onnxslim cannot simplify: --no-slim exports it as is
        raise_if_interrupted(e)
        raise KdtoolError(f"onnxslim failed to simplify the graph: {type(e).__name__}: "
                          f"{message_line(e)}",
                          "export with --no-slim") from e
    return slimmed, f"onnxslim {getattr(onnxslim, '__version__', '')}".strip()


def _check(proto, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    # full_check runs shape inference too, whose errors are not ValidationErrors
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise KdtoolError(
            f"the {what} ONNX graph fails onnx.checker: {message_line(e)}",
            "try --no-slim or --exporter torchscript, and report it",
        ) from e
