import onnx
import pytest
from onnx import TensorProto, helper

from kdtool.errors import KdtoolError
from kdtool.export.metadata import OnnxInfo, read_info, write_info


def _linear_model():
    """A two-class linear classifier of 1x8x8 images."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 2], [0.0] * 128)
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]))


def _info(**kw):
    base = dict(
        input_name="input",
        output_name="logits",
        in_chans=1,
        input_size=[8, 8],
        mean=[0.5],
        std=[0.25],
        num_classes=2,
        class_names=["a", "b"],
    )
    return OnnxInfo(**{**base, **kw})


def test_metadata_round_trips_and_replaces(tmp_path):
    model = _linear_model()
    model.metadata_props.add(key="author", value="someone")
    write_info(model, _info(precision="fp16"))
    write_info(model, _info(precision="int8", batch=4))  # replaces, never duplicates
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    info = read_info(path)
    assert info == _info(precision="int8", batch=4)
    assert info.input_shape(3) == (3, 1, 8, 8)
    keys = [p.key for p in onnx.load(str(path)).metadata_props]
    assert sorted(keys) == ["author", "kdtool"]


def test_metadata_errors_name_the_file(tmp_path):
    plain = tmp_path / "plain.onnx"
    onnx.save(_linear_model(), str(plain))
    with pytest.raises(KdtoolError, match="plain.onnx' has no kdtool metadata"):
        read_info(plain)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00not onnx")
    with pytest.raises(KdtoolError, match="junk.onnx' is not a readable ONNX model"):
        read_info(junk)
    with pytest.raises(KdtoolError, match="precision 'int4'"):
        write_info(_linear_model(), _info(precision="int4"))


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_classes": 3, "class_names": []}, r"output is \[N, 2\], the metadata says 3 classes"),
    ({"input_size": [8, 9]},
     r"input is \[N, 1, 8, 8\], the metadata's NCHW input is \[N, 1, 8, 9\]"),
    ({"layout": "NHWC"}, r"the metadata's NHWC input is \[N, 8, 8, 1\]"),
    ({"input_name": "x"}, "the metadata names input 'x'"),
])
def test_metadata_that_disagrees_with_the_graph_is_refused(tmp_path, fields, message):
    model = _linear_model()
    write_info(model, _info(**fields))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(KdtoolError, match=message):
        read_info(path)
