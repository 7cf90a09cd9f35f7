"""kdtool export end to end on the digits teacher: metadata, batch, INT8, FP16, Triton, errors."""

import hashlib
import importlib.util
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from kdtool.checkpoint import read_meta
from kdtool.data import load_data
from kdtool.errors import KdtoolError
from kdtool.export import pipeline
from kdtool.export.metadata import read_info
from kdtool.export.parity import Tolerance, normalise
from kdtool.export.precision import fold_bias_dequantize, quant_zero_points
from kdtool.export.runners import OrtRunner, load_runner


def _digits_test(meta):
    data = load_data("digits:test", image_size=tuple(meta.input_size), channels=meta.in_chans)
    return normalise(data.x, meta.mean, meta.std), data.y.numpy()


def test_metadata_round_trips(fp32_export, digits_teacher):
    path, result = fp32_export
    meta = read_meta(digits_teacher)
    info = read_info(path)
    assert (info.arch, info.num_classes, info.in_chans) == (meta.arch, 10, 1)
    assert info.input_size == meta.input_size and info.class_names == meta.class_names
    assert info.mean == meta.mean and info.std == meta.std
    assert info.precision == "fp32" and info.layout == "NCHW" and info.input_dtype == "float32"
    assert info.batch is None and info.max_batch == 256 and info.opset == 18
    assert info.folded is False and info.source == Path(digits_teacher).name
    assert info.source_sha256 == hashlib.sha256(Path(digits_teacher).read_bytes()).hexdigest()
    graph = onnx.load(str(path)).graph
    assert (info.input_name, info.output_name) == (graph.input[0].name, graph.output[0].name)
    with OrtRunner(path) as runner:
        assert runner.info == info  # ONNX Runtime's custom metadata map carries the same
    assert result["onnx_export"]["opset"] == 18 and result["onnx_export"]["exporter"] == "dynamo"
    from importlib import metadata

    import kdtool

    assert info.exported_with["kdtool_version"] == kdtool.__version__
    assert info.exported_with["torch"] == metadata.version("torch")
    assert info.exported_with["onnx"] == onnx.__version__


def test_info_reads_the_onnx_metadata_and_checkpoint_stages_refuse_onnx(cli, int8_export,
                                                                         monkeypatch):
    path, _ = int8_export
    r = cli("info", path, "--json")
    assert r.code == 0, r.err
    got = r.json()
    assert got["format"] == "onnx" and got["precision"] == "int8"
    assert got == {**got, **asdict(read_info(path))}
    assert got["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setenv("COLUMNS", "200")
    out = cli("info", path).out
    assert "ONNX, int8, opset 18, batch dynamic" in out and "int8 calib_method" in out
    assert f"onnx {onnx.__version__}" in out  # exported with
    r = cli("calibrate", path, "--data", "digits")
    assert r.code == 1 and "is an ONNX model, not a kdtool checkpoint" in r.err
    assert "kdtool eval FILE.onnx" in r.err and "Traceback" not in r.err


def test_parity_and_accuracy_are_reported(fp32_export):
    _, r = fp32_export
    p = r["parity"]["fp32"]
    assert p["passed"] and [b["batch"] for b in p["batches"]] == [1, 37]
    assert p["max_rel_diff"] <= 1e-3 and p["top1_agreement"] == 100.0
    assert r["parity_inputs"].startswith("digits:test")  # real images when --val is given
    v = r["val"]
    assert v["images"] == 360 and v["agreement"] == 100.0
    assert v["torch_fp32_top1"] == pytest.approx(v["onnx_fp32_top1"]) and v["torch_fp32_top1"] > 90


def test_dynamic_batch_takes_any_size(fp32_export, digits_teacher):
    path, _ = fp32_export
    x, _ = _digits_test(read_meta(digits_teacher))
    with load_runner(path) as runner:
        assert runner.fixed_batch is None
        full = runner.infer(x[:300])
        for n in (1, 5, 37):
            y = runner.infer(x[:n])
            assert y.shape == (n, 10) and y.dtype == np.float32
            np.testing.assert_allclose(y, full[:n], rtol=1e-4, atol=1e-5)


def _model_config_pb2():
    """Triton's own ModelConfig message (tritonclient ships it; its package needs grpc)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed")
    pb2 = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    if not pb2.is_file():
        pytest.skip("this tritonclient has no model_config_pb2")
    module_spec = importlib.util.spec_from_file_location("kdtool_test_model_config_pb2", pb2)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _parse_config(path: Path):
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    return text_format.Parse(path.read_text(), pb2.ModelConfig()), pb2


def _dims(value_info) -> list[int]:
    return [
        d.dim_value if d.HasField("dim_value") else -1
        for d in value_info.type.tensor_type.shape.dim
    ]


def test_triton_repository_parses_and_matches_the_graph(fp32_export, digits_teacher):
    path, r = fp32_export
    model_dir = Path(r["triton"]["path"])
    assert model_dir.name == "teacher" and r["triton"]["platform"] == "onnx"
    config, pb2 = _parse_config(model_dir / "config.pbtxt")
    graph = onnx.load(str(path)).graph
    assert config.name == "teacher" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 256 and config.HasField("dynamic_batching")
    assert [i.name for i in config.input] == [graph.input[0].name]
    assert [o.name for o in config.output] == [graph.output[0].name]
    assert list(config.input[0].dims) == _dims(graph.input[0])[1:] == [1, 8, 8]
    assert list(config.output[0].dims) == [10]
    assert config.input[0].data_type == pb2.TYPE_FP32
    assert (model_dir / "1" / "model.onnx").read_bytes() == path.read_bytes()
    labels = (model_dir / config.output[0].label_filename).read_text().splitlines()
    assert labels == read_meta(digits_teacher).class_names


def test_int8_is_qdq_with_zero_zero_points_and_agrees_with_fp32(int8_export, fp32_export):
    path, r = int8_export
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert "QLinearConv" not in ops  # QDQ format, not operator-oriented
    zps = quant_zero_points(model)
    assert len(zps) > 0 and all(np.all(z == 0) for z in zps.values())
    assert {z.dtype for z in zps.values()} <= {np.dtype(np.int8), np.dtype(np.int32)}
    info = read_info(path)
    assert info.precision == "int8" and info.quantization["activations"] == "int8 symmetric"
    assert info.quantization["calib_images"] == 256 and info.quantization["calib_seed"] == 0
    v = r["val"]
    assert v["agreement"] >= 95.0, v  # top-1 agreement with FP32 on digits:test
    assert abs(v["top1_change"]) <= 3.0
    assert r["sizes"]["onnx_bytes"] < 0.5 * r["sizes"]["fp32_bytes"]
    # ONNX Runtime FP32 against INT8 directly, on the whole test split
    x, _ = _digits_test(read_meta(r["checkpoint"]))
    with OrtRunner(fp32_export[0]) as a, OrtRunner(path) as b:
        agree = (a.infer(x).argmax(1) == b.infer(x).argmax(1)).mean()
    assert agree >= 0.95


def test_entropy_calibration_clips_activation_ranges_that_minmax_keeps_whole(
        cli, digits_teacher, int8_export, tmp_path):
    """quantize_static's own entropy calibrator (128 bins) had one candidate threshold, the
    full range: the file said entropy and held minmax's scales."""
    from onnx import numpy_helper

    out = tmp_path / "entropy.onnx"
    r = cli("export", digits_teacher, "--onnx", out, "--precision", "int8", "--calib-data",
            "digits", "--calib-images", "256", "--calib-method", "entropy", "--json")
    assert r.code == 0, r.err
    assert read_info(out).quantization["calib_method"] == "entropy"

    def scales(path):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
                if t.name.endswith("_scale") and t.dims == []}  # per-tensor: activations

    minmax, entropy = scales(int8_export[0]), scales(out)
    assert minmax.keys() == entropy.keys() and minmax
    # a threshold inside the range, never beyond it
    assert all(entropy[k] <= minmax[k] * (1 + 1e-6) for k in minmax)
    assert sum(entropy[k] < minmax[k] * 0.99 for k in minmax) >= 1, (minmax, entropy)
    assert r.json()["parity"]["int8"]["passed"]


def test_asymmetric_int8_activations_have_uint8_zero_points_and_are_not_for_tensorrt(
        cli, digits_teacher, tmp_path):
    out = tmp_path / "a.onnx"
    r = cli("export", digits_teacher, "--onnx", out, "--precision", "int8", "--calib-data",
            "digits", "--calib-images", "128", "--int8-activations", "asymmetric", "--json")
    assert r.code == 0, r.err
    q = read_info(out).quantization
    assert q["activations"] == "uint8 asymmetric" and q["tensorrt_compatible"] is False
    zps = quant_zero_points(onnx.load(str(out)))
    activations = [z for z in zps.values() if z.dtype == np.uint8]
    assert activations and any(np.any(z != 0) for z in activations)  # real zero points
    assert r.json()["parity"]["int8"]["passed"]


@pytest.mark.parametrize("exact", [False, True])
def test_an_int8_check_on_uint8_weights_says_its_cpu_is_no_guide_to_speed(
        cli, digits_teacher, tmp_path, monkeypatch, exact):
    """x86 without VNNI checks INT8 on uint8 weights (same values, no fast kernels): the
    export says so, and the file it writes keeps int8 weights either way."""
    import kdtool.export.cpu_int8 as cpu_int8

    monkeypatch.setattr(cpu_int8, "int8_weights_exact", lambda: exact)
    out = tmp_path / "m.onnx"
    args = ("export", digits_teacher, "--onnx", out, "--precision", "int8", "--calib-data",
            "digits", "--calib-images", "64")
    r = cli(*args, "--json")
    assert r.code == 0, r.err
    assert ("cpu_caveat" in r.json()) is not exact
    if not exact:
        assert "time INT8 on the target" in r.json()["cpu_caveat"]
        table = " ".join(cli(*args, "--force").out.split())
        assert "this CPU" in table and "the file keeps its int8 weights" in table
    graph = onnx.load(str(out)).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    quantized = {inits.get(n.input[0]) for n in graph.node if n.op_type == "DequantizeLinear"}
    assert onnx.TensorProto.INT8 in quantized and onnx.TensorProto.UINT8 not in quantized


def test_bias_dequantize_folding_keeps_the_outputs(int8_export, tmp_path):
    path, _ = int8_export
    model = onnx.load(str(path))
    inits = {t.name: t.data_type for t in model.graph.initializer}
    int32_dq = [
        n
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) == TensorProto.INT32
    ]
    assert int32_dq, "expected int32 bias dequantisation in the QDQ graph"
    assert fold_bias_dequantize(model) == len(int32_dq)
    onnx.checker.check_model(model)
    folded = tmp_path / "folded.onnx"
    onnx.save(model, str(folded))
    x = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    with OrtRunner(path) as a, OrtRunner(folded) as b:
        np.testing.assert_allclose(a.infer(x), b.infer(x), rtol=1e-4, atol=1e-4)


def test_fp16_static_batch_and_its_triton_config(cli, digits_teacher, tmp_path):
    run = cli(
        "export",
        digits_teacher,
        "--onnx",
        tmp_path / "t16.onnx",
        "--precision",
        "fp16",
        "--batch",
        "8",
        "--triton-repo",
        tmp_path / "repo",
        "--json",
    )
    assert run.code == 0, run.err
    r = run.json()
    assert r["parity"]["fp16"]["passed"] and r["batch"] == {
        "min": 8,
        "opt": 8,
        "max": 8,
        "static": True,
    }
    model = onnx.load(str(tmp_path / "t16.onnx"))
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT  # kept fp32
    assert _dims(model.graph.input[0]) == [8, 1, 8, 8]
    info = read_info(tmp_path / "t16.onnx")
    assert info.precision == "fp16" and info.batch == 8
    with OrtRunner(tmp_path / "t16.onnx") as runner:
        assert runner.fixed_batch == 8
        assert runner.infer(np.zeros((8, 1, 8, 8), np.float32)).dtype == np.float32
        with pytest.raises(KdtoolError, match="batches of exactly 8"):
            runner.infer(np.zeros((5, 1, 8, 8), np.float32))
    config, _ = _parse_config(tmp_path / "repo" / "t16" / "config.pbtxt")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [8, 1, 8, 8]
    assert config.output[0].data_type == config.input[0].data_type  # both TYPE_FP32


def _one_line_error(r, *fragments):
    assert r.code == 1, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert "Traceback" not in r.err and len(lines) >= 1
    last = lines[-1]  # progress lines may come first; the error is one line
    assert last.startswith("error: "), r.err
    for f in fragments:
        assert f in last, (f, last)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--precision", "int9"], ["unknown precision 'int9'", "did you mean 'int8'"]),
        (["--precision", "int8"], ["needs calibration images", "--calib-data"]),
        (["--batch", "4:2:8"], ["4:2:8", "MIN <= OPT <= MAX"]),
        (["--batch", "0:1:2"], ["positive"]),
        (["--batch", "1:2"], ["bad --batch '1:2'"]),
        (["--batch", "a"], ["not integers"]),
        (["--exporter", "dynamic"], ["unknown exporter", "did you mean 'dynamo'"]),
        (["--opset", "7"], ["--opset 7"]),
        (["--calib-images", "64"], ["--calib-images sets up INT8", "--precision is fp32",
                                    "add --precision int8"]),
        (["--precision", "fp16", "--calib-method", "entropy"], ["--calib-method sets up"]),
        # TensorRT and Triton settings without --trt / --triton-repo would change nothing.
        (["--engine", "m.engine"], ["--engine configures the TensorRT build", "add --trt"]),
        (["--workspace", "8"], ["--workspace configures the TensorRT build"]),
        (["--timing-cache", "c.cache"], ["--timing-cache configures"]),
        (["--triton-name", "m"], ["--triton-name names the model", "add --triton-repo DIR"]),
        (["--min-agreement", "99"], ["--min-agreement sets the top-1 agreement",
                                     "add --precision or --trt"]),
        (
            [
                "--precision",
                "int8",
                "--calib-data",
                "digits",
                "--trt",
                "--int8-activations",
                "asymmetric",
            ],
            ["TensorRT takes only symmetric INT8 activations"],
        ),
    ],
)
def test_bad_options_are_one_line_errors(cli, digits_teacher, tmp_path, args, fragments):
    out = tmp_path / "m.onnx"
    r = cli("export", digits_teacher, "--onnx", out, *args)
    _one_line_error(r, *fragments)
    assert not out.exists()


def test_int8_calibration_images_take_the_models_channels_as_calibrate_takes_them(
        cli, digits_teacher, tmp_path):
    import numpy as np

    from kdtool.checkpoint import ModelMeta, save_checkpoint
    from kdtool.models import create_model

    # Colour images for a grey model: converted to grey, as predict and serve convert them.
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x=np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8),
             y=np.full(64, -1))
    r = cli("export", digits_teacher, "--onnx", tmp_path / "q.onnx", "--precision", "int8",
            "--calib-data", rgb)
    assert r.code == 0, r.err
    assert "they are converted to grey" in " ".join(r.err.split())
    # Grey images for a colour model: refused, equal channels carry no colour.
    colour = tmp_path / "rgb_model.safetensors"
    save_checkpoint(colour, create_model("tiny_cnn", num_classes=10, in_chans=3),
                    ModelMeta(arch="tiny_cnn", num_classes=10, in_chans=3, input_size=[8, 8],
                              mean=[0.5] * 3, std=[0.25] * 3), force=False)
    out = tmp_path / "c.onnx"
    r = cli("export", colour, "--onnx", out, "--precision", "int8", "--calib-data", "digits")
    _one_line_error(r, "--calib-data", "has 1-channel images but the model takes 3",
                    "INT8 activation ranges of grey copies with equal channels have none of "
                    "the colour")
    assert not out.exists()


def test_a_file_where_a_triton_folder_goes_is_refused_before_the_export(cli, digits_teacher,
                                                                        tmp_path):
    (tmp_path / "repo").write_text("not a folder")
    r = cli("export", digits_teacher, "--onnx", tmp_path / "m.onnx", "--triton-repo",
            tmp_path / "repo")
    _one_line_error(r, "is a file, not a folder")
    (tmp_path / "repo2").mkdir()
    (tmp_path / "repo2" / "m").write_text("a file named like the model")
    r = cli("export", digits_teacher, "--onnx", tmp_path / "m.onnx", "--triton-repo",
            tmp_path / "repo2", "--force")
    _one_line_error(r, "is a file where the Triton model's folder goes")
    assert not (tmp_path / "m.onnx").exists()


def test_a_triton_folder_is_checked_before_the_export_replaces_the_onnx(
        cli, digits_teacher, tmp_path, monkeypatch):
    """An unwritable repository failed after the ONNX had replaced the old one; --force
    replaced a model folder with another version (2/) and a user's file in it."""
    import os

    out = tmp_path / "m.onnx"
    out.write_bytes(b"an earlier export")
    model = tmp_path / "repo" / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.onnx").write_bytes(b"kdtool's")
    (model / "2").mkdir()
    (model / "notes.txt").write_text("mine")
    r = cli("export", digits_teacher, "--onnx", out, "--triton-repo", tmp_path / "repo",
            "--force")
    _one_line_error(r, "holds what kdtool did not write (2/, notes.txt)", "would delete it",
                    "another --triton-name")
    assert sorted(os.listdir(model)) == ["1", "2", "notes.txt"]
    real = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) and
                        mode == os.W_OK else real(p, mode))
    r = cli("export", digits_teacher, "--onnx", out, "--triton-repo", ro, "--force")
    _one_line_error(r, f"cannot write to --triton-repo '{ro}'", "not a writable folder")
    r = cli("export", digits_teacher, "--onnx", out, "--triton-repo", ro / "sub" / "repo",
            "--force")  # a repository to be made in it
    _one_line_error(r, f"'{ro}' is not a writable folder")
    assert out.read_bytes() == b"an earlier export"  # nothing was exported
    # kdtool's own files only: --force replaces them
    (model / "notes.txt").unlink()
    (model / "2").rmdir()
    # and the work folders of a killed export (SIGKILL: pid 2**22, above Linux's pid_max)
    from kdtool.export.pipeline import EXPORT_WORK
    from kdtool.io import temp_prefix

    left = [tmp_path / (temp_prefix(n).replace(f"-{os.getpid()}.", f"-{2**22}.") + "x.tmp")
            for n in (EXPORT_WORK, "m")]
    left[1] = tmp_path / "repo" / left[1].name
    for d in left:
        d.mkdir()
        (d / "fp32.onnx").write_bytes(b"half")
        os.utime(d, (0, 0))  # long ago: kdtool.io.LEFT_BEHIND_AGE_S
    r = cli("export", digits_teacher, "--onnx", out, "--triton-repo", tmp_path / "repo",
            "--force")
    assert r.code == 0, r.err
    assert (model / "1" / "model.onnx").read_bytes() == out.read_bytes()
    assert not any(d.exists() for d in left)


def test_refuses_to_overwrite_and_non_kdtool_checkpoints(cli, digits_teacher, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    _one_line_error(cli("export", digits_teacher, "--onnx", out), "already exists", "--force")
    assert out.read_bytes() == b"old"
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    _one_line_error(cli("export", plain, "--onnx", tmp_path / "a.onnx"), "not a kdtool")
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, bare)
    _one_line_error(cli("export", bare, "--onnx", tmp_path / "b.onnx"), "without kdtool metadata")
    _one_line_error(
        cli("export", tmp_path / "missing.safetensors", "--onnx", tmp_path / "c.onnx"),
        "does not exist",
    )


def test_without_onnx_the_file_goes_beside_the_checkpoint(cli, digits_teacher, tmp_path):
    from kdtool.export.formats import FORMATS, onnx_format, onnx_path_for

    ckpt = tmp_path / "student.cal.safetensors"
    ckpt.write_bytes(Path(digits_teacher).read_bytes())
    r = cli("export", ckpt, "--json")
    assert r.code == 0, r.err
    assert r.json()["onnx"] == str(tmp_path / "student.cal.onnx")
    assert read_info(tmp_path / "student.cal.onnx").source == ckpt.name
    _one_line_error(cli("export", ckpt), "student.cal.onnx' already exists", "--force")
    first = (tmp_path / "student.cal.onnx").read_bytes()
    table = " ".join(cli("export", ckpt, "--force").out.split())
    assert "student.cal.onnx (fp32, " in table and "; fp32" not in table  # one size, once
    assert (tmp_path / "student.cal.onnx").read_bytes() == first  # byte for byte (README)
    # Each precision has a name of its own, as bench --formats names its exports.
    names = {p: onnx_path_for(ckpt, onnx_format(p)).name for p in ("fp32", "fp16", "int8")}
    assert names == {"fp32": "student.cal.onnx", "fp16": "student.cal.fp16.onnx",
                     "int8": "student.cal.int8.onnx"}
    assert onnx_path_for(ckpt, FORMATS["tensorrt"], tmp_path / "b").name == "student.cal.trt.onnx"


def test_failed_parity_leaves_no_file(cli, digits_teacher, tmp_path, monkeypatch):
    # An impossible tolerance stands in for a broken export: the check must stop the write.
    monkeypatch.setitem(pipeline.TOLERANCES, "fp32", Tolerance(max_rel_diff=-1.0))
    out = tmp_path / "m.onnx"
    r = cli("export", digits_teacher, "--onnx", out, "--triton-repo", tmp_path / "repo")
    _one_line_error(r, "FP32 export fails its parity check", "nothing was written",
                    "try --exporter torchscript")
    assert os.listdir(tmp_path) == []  # no ONNX, no Triton repository, no temporary folder
    out.write_bytes(b"an earlier export")  # with --force, a failed check keeps the old file
    r = cli("export", digits_teacher, "--onnx", out, "--force")
    _one_line_error(r, "FP32 export fails its parity check")
    assert out.read_bytes() == b"an earlier export" and os.listdir(tmp_path) == ["m.onnx"]


def test_a_failed_reduced_precision_check_offers_fixes_and_a_lower_bar_only_when_close():
    cfg = pipeline.ExportConfig(checkpoint="s.safetensors", onnx="s.onnx", precision="int8")
    close = pipeline._parity_hint("INT8", 87.5, cfg)
    assert "--calib-method entropy or percentile" in close
    assert "--int8-activations asymmetric" in close and "--precision fp16" in close
    assert close.endswith("--min-agreement 87")  # what the file would pass at
    far = pipeline._parity_hint("INT8", 6.2, replace(cfg, calib_method="percentile",
                                                     int8_activations="asymmetric"))
    assert "--calib-method minmax or entropy" in far and "asymmetric" not in far
    assert "--min-agreement" in far and "would only write a model that predicts" in far
    assert "--precision fp32" in pipeline._parity_hint("FP16", 50.0, cfg)
    # A TensorRT engine: the same rule for a lower bar; it once offered it at any agreement.
    trt_far = pipeline._parity_hint("TensorRT", 40.0, cfg)
    assert "try --precision fp32" in trt_far and "would only write a model" in trt_far
    assert pipeline._parity_hint("TensorRT", 99.0, cfg).endswith("--min-agreement 99")
    trt32 = pipeline._parity_hint("TensorRT", 12.0, replace(cfg, precision="fp32"))
    assert "run it on ONNX Runtime" in trt32 and "try --precision" not in trt32


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
    reason="TensorRT and a GPU are here",
)
def test_trt_without_tensorrt_writes_the_onnx_then_fails(cli, digits_teacher, tmp_path):
    out = tmp_path / "m.onnx"
    r = cli("export", digits_teacher, "--onnx", out, "--trt", "--triton-repo",
            tmp_path / "repo")
    _one_line_error(r, f"wrote {out}", "--trt needs", "pip install 'kdtool[gpu]'")
    assert read_info(out).precision == "fp32"  # the verified ONNX is there
    assert not (tmp_path / "m.engine").exists()
    assert not (tmp_path / "repo" / "m").exists()  # a --trt repository holds the engine


def test_a_graph_onnxslim_or_the_checker_chokes_on_is_one_line_with_the_way_out(
        cli, digits_teacher, tmp_path, monkeypatch):
    import onnx

    onnxslim = pytest.importorskip("onnxslim")

    def choke(proto):
        raise ValueError("cannot fold this node\nmore detail")

    monkeypatch.setattr(onnxslim, "slim", choke)
    r = cli("export", digits_teacher, "--onnx", tmp_path / "m.onnx")
    _one_line_error(r, "onnxslim failed to simplify the graph: ValueError: cannot fold this "
                    "node", "export with --no-slim")
    assert not (tmp_path / "m.onnx").exists()

    def bad_shapes(proto, full_check=False):
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] rank mismatch")

    monkeypatch.setattr(onnx.checker, "check_model", bad_shapes)
    r = cli("export", digits_teacher, "--onnx", tmp_path / "m.onnx", "--no-slim")
    _one_line_error(r, "fails onnx.checker: [ShapeInferenceError] rank mismatch")


def test_the_engine_is_built_beside_its_destination_and_lands_whole(cli, digits_teacher,
                                                                    tmp_path, monkeypatch):
    """TensorRT faked (no GPU here): the engine and sidecar are written in their own folder
    (a rename cannot cross filesystems), renamed into place only after the parity check."""
    import kdtool.export.engine as engine_mod
    import kdtool.export.formats as formats_mod
    import kdtool.export.runners as runners_mod

    onnx_path, engine = tmp_path / "a" / "m.onnx", tmp_path / "b" / "m.engine"
    built_at, skew = [], [0.0]

    def fake_build(onnx_file, engine_path, **kwargs):
        assert Path(engine_path) != engine and not engine.exists()  # a temporary, aside
        built_at.append(Path(engine_path).parent)
        Path(engine_path).write_bytes(b"serialized engine")
        return {"tensorrt_version": "fake"}

    class FakeTrt(runners_mod.OrtRunner):  # runs the ONNX itself: parity passes unless skewed
        def __init__(self, engine_file):
            assert Path(engine_file).read_bytes() == b"serialized engine"
            assert not engine.exists()  # not in place before its parity check
            super().__init__(onnx_path)

        def infer(self, x):
            y = super().infer(x)
            return y + skew[0] * np.arange(y.shape[1], dtype=y.dtype)

    monkeypatch.setattr(formats_mod, "require", lambda *a, **k: None)
    monkeypatch.setattr(engine_mod, "build_engine", fake_build)
    monkeypatch.setattr(runners_mod, "TrtRunner", FakeTrt)
    (tmp_path / "b").mkdir()
    r = cli("export", digits_teacher, "--onnx", onnx_path, "--trt", "--engine", engine, "--json")
    assert r.code == 0, r.err
    assert built_at == [engine.parent]
    assert engine.read_bytes() == b"serialized engine"
    assert json.loads(engine.with_suffix(".engine.json").read_text())["parity"]["passed"]
    assert sorted(p.name for p in engine.parent.iterdir()) == ["m.engine", "m.engine.json"]
    # An engine that fails its parity check is not written, and leaves no temporary.
    skew[0] = 100.0
    engine.unlink()
    engine.with_suffix(".engine.json").unlink()
    r = cli("export", digits_teacher, "--onnx", onnx_path, "--trt", "--engine", engine,
            "--force")
    assert r.code == 1 and "the engine was not written (the ONNX was)" in r.err
    assert list(engine.parent.iterdir()) == [] and onnx_path.is_file()


def test_an_uncalibrated_students_onnx_keeps_the_warning(cli, digits_teacher, tmp_path,
                                                         capsys):
    """The checkpoint's "not yet calibrated" warning once ended at export: the .onnx that
    ships scored far below what the student learnt, and info, eval, predict, bench and
    serve said nothing."""
    from PIL import Image

    from kdtool.checkpoint import load_checkpoint, save_checkpoint
    from kdtool.deploy.server.model import OnnxModel

    model, meta = load_checkpoint(digits_teacher)
    meta.stages["distill"] = {"bn_running_stats": "noise"}  # as distill marks its output
    student = save_checkpoint(tmp_path / "s.safetensors", model, meta, force=False)
    onnx_path = tmp_path / "s.onnx"
    r = cli("export", student, "--onnx", onnx_path, "--exporter", "torchscript")
    assert r.code == 0 and "not yet calibrated" in r.err, r.err
    said = "was exported from a distilled student whose BN running statistics are noise"
    r = cli("info", onnx_path)
    assert r.code == 0 and said in r.err and "never calibrated" in r.out
    assert cli("info", onnx_path, "--json").json()["bn_running_stats"] == "noise"
    r = cli("eval", onnx_path, "--data", "digits:test")
    assert r.code == 0 and said in r.err and "calibrate s.safetensors" in r.err
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    r = cli("predict", onnx_path, tmp_path / "a.png")
    assert r.code == 0 and said in r.err
    capsys.readouterr()
    assert OnnxModel(onnx_path, warmup=False).info.bn_running_stats == "noise"  # serve's
    assert said in capsys.readouterr().err
    # A calibrated student's export is quiet.
    meta.stages["calibrate"] = {"folded": False}
    save_checkpoint(tmp_path / "c.safetensors", model, meta, force=False)
    r = cli("export", tmp_path / "c.safetensors", "--onnx", tmp_path / "c.onnx", "--exporter",
            "torchscript")
    assert r.code == 0 and "not yet calibrated" not in r.err
    r = cli("info", tmp_path / "c.onnx")
    assert r.code == 0 and "noise statistics" not in r.err + r.out


def test_int8_calibration_decodes_only_the_calib_images_it_uses(cli, digits_teacher, tmp_path,
                                                               decoded, digits_pngs):
    import numpy as np
    import onnx

    folder = digits_pngs(200)
    r = cli("export", digits_teacher, "--onnx", tmp_path / "q.onnx", "--precision", "int8",
            "--calib-data", folder, "--calib-images", "48", "--json")
    assert r.code == 0, r.err
    assert decoded == [48] and r.json()["quantization"]["calib_images"] == 48
    # The graph a decode of all 200 gives: the draw picks the images it picked.
    from kdtool.data import load_data

    x = load_data("digits").x[:200, 0].numpy()  # the PNGs' pixels: PNG is lossless
    np.savez(tmp_path / "calib.npz", x=x, y=np.full(200, -1))
    r2 = cli("export", digits_teacher, "--onnx", tmp_path / "q2.onnx", "--precision", "int8",
             "--calib-data", tmp_path / "calib.npz", "--calib-images", "48", "--json")
    assert r2.code == 0, r2.err
    graphs = [onnx.load(str(tmp_path / f)).graph for f in ("q.onnx", "q2.onnx")]
    # the graphs (weights, scales, zero points) are one; metadata names each calib source
    assert graphs[0].SerializeToString() == graphs[1].SerializeToString()


def test_fewer_calibration_images_than_calib_images_says_so(cli, digits_teacher, tmp_path,
                                                            digits_pngs):
    folder = digits_pngs(40)
    r = cli("export", digits_teacher, "--onnx", tmp_path / "q.onnx", "--precision", "int8",
            "--calib-data", folder, "--calib-images", "64", "--json")
    assert r.code == 0, r.err
    assert r.json()["quantization"]["calib_images"] == 40
    err = " ".join(r.err.split())
    assert "has 40 images, fewer than --calib-images 64: the INT8 ranges come from all 40" in err
    r = cli("export", digits_teacher, "--onnx", tmp_path / "q2.onnx", "--precision", "int8",
            "--calib-data", folder, "--calib-images", "40", "--json")
    assert r.code == 0 and "fewer than" not in r.err
    # the default (512) takes all there are when fewer, without a word
    r = cli("export", digits_teacher, "--onnx", tmp_path / "q3.onnx", "--precision", "int8",
            "--calib-data", folder, "--json")
    assert r.code == 0 and "fewer than" not in r.err
    assert r.json()["quantization"]["calib_images"] == 40


def test_an_int8_export_of_a_one_class_model_warns_that_agreement_says_little(cli, tmp_path):
    from kdtool.checkpoint import ModelMeta, save_checkpoint
    from kdtool.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", num_classes=10, in_chans=1).eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.bias[3] = 1000.0  # collapsed: class 3 for every image
    meta = ModelMeta(arch="tiny_cnn", num_classes=10, in_chans=1, input_size=[8, 8],
                     mean=[0.5], std=[0.25], class_names=[str(i) for i in range(10)])
    ckpt = save_checkpoint(tmp_path / "one.safetensors", model, meta, force=False)
    r = cli("export", ckpt, "--onnx", tmp_path / "q.onnx", "--precision", "int8",
            "--calib-data", "digits", "--calib-images", "64", "--val", "digits:test", "--json")
    assert r.code == 0, r.err
    err = " ".join(r.err.split())
    assert "answers one class for all" in err and "judge it by its logits" in err
    assert r.json()["parity"]["int8"]["reference_classes"] == 1
