"""kdtool.io: input checks and atomic, never-overwriting output."""

import pytest

from kdtool.errors import KdtoolError
from kdtool.io import atomic_write_text, check_output, require_file


def test_require_file_names_the_path_and_the_fix(tmp_path):
    f = tmp_path / "model.onnx"
    with pytest.raises(KdtoolError, match="ONNX model '.*model.onnx' does not exist") as e:
        require_file(f, "ONNX model", "pass the exported file")
    assert e.value.hint == "pass the exported file"
    with pytest.raises(KdtoolError, match="is not a file"):
        require_file(tmp_path, "ONNX model")
    f.write_bytes(b"x")
    assert require_file(str(f), "ONNX model") == f


def test_outputs_are_written_whole_and_never_overwritten_without_force(tmp_path):
    out = tmp_path / "sub" / "result.json"
    assert check_output(out, force=False) == out and out.parent.is_dir()
    atomic_write_text(out, "first")
    with pytest.raises(KdtoolError, match="already exists"):
        check_output(out, force=False)
    check_output(out, force=True)
    atomic_write_text(out, "second")
    assert out.read_text() == "second"
    assert [p.name for p in out.parent.iterdir()] == ["result.json"]  # no temp file left
