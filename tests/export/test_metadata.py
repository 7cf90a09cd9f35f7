import onnx
import pytest
from onnx import TensorProto, helper

from kdtool.errors import KdtoolError
from kdtool.export.metadata import OnnxInfo, read_info, write_info


def _identity_model():
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y])
    return helper.make_model(graph)


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
    model = _identity_model()
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
    onnx.save(_identity_model(), str(plain))
    with pytest.raises(KdtoolError, match="plain.onnx' has no kdtool metadata"):
        read_info(plain)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\x00not onnx")
    with pytest.raises(KdtoolError, match="junk.onnx' is not a readable ONNX model"):
        read_info(junk)
    with pytest.raises(KdtoolError, match="precision 'int4'"):
        write_info(_identity_model(), _info(precision="int4"))
