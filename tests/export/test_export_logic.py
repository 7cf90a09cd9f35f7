"""The pure logic of kdtool export: batch profiles, TensorRT version dispatch, the formats
table, parity judgement, Triton configs, runner refusals. No TensorRT is imitated here:
the TensorRT tests proper run where it is installed (test_tensorrt_gpu.py)."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kdtool.data import ImageData
from kdtool.errors import KdtoolError
from kdtool.export.batch import BatchProfile, parse_batch
from kdtool.export.engine import precision_plan, trt_major
from kdtool.export.formats import FORMATS, onnx_format, require
from kdtool.export.metadata import PRECISIONS
from kdtool.export.parity import TOLERANCES, Tolerance, compare, parity_batches
from kdtool.export.triton import config_text, model_name


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1:32:256", BatchProfile(1, 32, 256)),
        ("4:4:4", BatchProfile(4, 4, 4)),
        (" 2 : 8 : 16 ", BatchProfile(2, 8, 16)),
        ("8", BatchProfile(8, 8, 8, static=True)),
    ],
)
def test_batch_profiles_parse(text, expected):
    assert parse_batch(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("8:4:16", "MIN <= OPT <= MAX"),
        ("1:32:16", "MIN <= OPT <= MAX"),
        ("0:1:2", "positive"),
        ("-1", "positive"),
        ("0", "positive"),
        ("1:2", "bad --batch"),
        ("1:2:3:4", "bad --batch"),
        ("1.5:2:3", "not integers"),
        ("", "not integers"),
    ],
)
def test_bad_batch_profiles_say_what_is_wrong(text, message):
    with pytest.raises(KdtoolError, match=message):
        parse_batch(text)


def test_profile_shapes_and_clamping():
    p = parse_batch("2:16:64")
    assert p.shapes((3, 32, 32)) == {
        "min": (2, 3, 32, 32),
        "opt": (16, 3, 32, 32),
        "max": (64, 3, 32, 32),
    }
    assert (p.clamp(1), p.clamp(37), p.clamp(100)) == (2, 37, 64)
    assert parse_batch("8").spec == "8" and p.spec == "2:16:64"


@pytest.mark.parametrize(
    "version, major", [("10.13.0.35", 10), ("11.0.0", 11), ("8.6.1", 8), ("12.1", 12)]
)
def test_trt_major(version, major):
    assert trt_major(version) == major


def test_trt_major_refuses_garbage():
    with pytest.raises(KdtoolError, match="cannot read the TensorRT version"):
        trt_major("unknown")


@pytest.mark.parametrize(
    "precision, flags", [("fp32", ()), ("fp16", ("FP16",)), ("int8", ("INT8",))]
)
def test_trt10_is_weakly_typed_with_precision_flags(precision, flags):
    plan = precision_plan(precision, "10.13.2.6")
    assert not plan.strongly_typed and plan.builder_flags == flags


@pytest.mark.parametrize("version", ["11.0.0.114", "11.4.1"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_trt11_takes_precision_from_the_graph(precision, version):
    plan = precision_plan(precision, version)
    assert plan.strongly_typed and plan.builder_flags == ()


def test_old_tensorrt_and_unknown_precision_are_refused():
    with pytest.raises(KdtoolError, match="too old"):
        precision_plan("fp16", "8.6.1.6")
    with pytest.raises(KdtoolError, match="did you mean 'fp16'"):
        precision_plan("fp61", "10.0.1")


def test_formats_table_covers_every_precision():
    for p in PRECISIONS:
        fmt = onnx_format(p)
        assert fmt.precisions == (p,) and fmt.runner == "onnxruntime" and fmt.suffix == ".onnx"
    assert onnx_format("int8").needs_calib and not onnx_format("fp16").needs_calib
    trt = FORMATS["tensorrt"]
    assert trt.needs_gpu and trt.needs_tensorrt and trt.runner == "tensorrt"
    assert set(trt.precisions) == set(PRECISIONS)
    assert FORMATS["triton"].runner is None and FORMATS["triton"].suffix == ""
    assert set(FORMATS) == {"onnx", "onnx-fp16", "onnx-int8", "tensorrt", "triton"}
    with pytest.raises(KdtoolError, match="did you mean 'int8'"):
        onnx_format("int9")


def test_missing_tensorrt_is_named_with_the_fix():
    lacks = FORMATS["tensorrt"].missing()
    assert ("the TensorRT Python package (tensorrt)" in lacks) == (
        importlib.util.find_spec("tensorrt") is None
    )
    assert ("a CUDA GPU" in lacks) == (not torch.cuda.is_available())
    if lacks:
        with pytest.raises(KdtoolError, match=r"wrote m.onnx, but --trt needs .*kdtool\[gpu\]"):
            require(FORMATS["tensorrt"], wrote="m.onnx", what="--trt")
    require(FORMATS["onnx"])  # needs nothing


class _Fixed:
    """A runner answering fixed logits (for judging parity, not for imitating a backend)."""

    def __init__(self, fn, name):
        self.fn, self.name = fn, name

    def infer(self, x):
        return self.fn(x)

    def describe(self):
        return {"backend": self.name}


def _logits(x):
    return x.reshape(len(x), -1)[:, :10].astype(np.float32) * 5


def test_parity_judges_difference_agreement_and_finiteness():
    batches = [
        np.random.default_rng(i).standard_normal((n, 1, 4, 4)).astype(np.float32)
        for i, n in enumerate((1, 37))
    ]
    ref = _Fixed(_logits, "ref")
    same = compare(ref, _Fixed(lambda x: _logits(x) + 1e-6, "close"), batches, TOLERANCES["fp32"])
    assert same.passed and same.images == 38 and [b["batch"] for b in same.batches] == [1, 37]
    assert same.max_abs_diff == pytest.approx(1e-6, rel=0.1)
    off = compare(ref, _Fixed(lambda x: _logits(x) + 0.5, "off"), batches, TOLERANCES["fp32"])
    assert not off.passed and "relative difference" in off.problem
    assert off.top1_agreement == 100.0  # a constant shift keeps the classes

    def swap(x):  # wrong class for every other image
        y = _logits(x)
        y[::2] = -y[::2]
        return y

    wrong = compare(ref, _Fixed(swap, "swap"), batches, TOLERANCES["int8"])
    assert not wrong.passed and "agreement" in wrong.problem and wrong.top1_agreement < 90
    nan = compare(ref, _Fixed(lambda x: _logits(x) * np.nan, "nan"), batches, Tolerance())
    assert not nan.passed and nan.problem == "non-finite outputs"


def test_agreement_with_a_reference_of_one_class_is_flagged_as_saying_little():
    batches = [np.random.default_rng(0).standard_normal((37, 1, 4, 4)).astype(np.float32)]

    def one_class(x):  # an untrained or collapsed model: class 3 for every image
        y = _logits(x)
        y[:, 3] += 100
        return y

    ref = _Fixed(one_class, "ref")
    far = compare(ref, _Fixed(lambda x: one_class(x) * 1.4, "int8"), batches, TOLERANCES["int8"])
    assert far.passed and far.top1_agreement == 100.0 and far.reference_classes == 1
    caveat = far.agreement_caveat()
    assert "ref answers one class for all 37 parity images" in caveat
    assert f"relative difference {far.max_rel_diff:.3g}" in caveat
    varied = compare(_Fixed(_logits, "ref"), _Fixed(_logits, "int8"), batches,
                     TOLERANCES["int8"])
    assert varied.reference_classes > 1 and varied.agreement_caveat() == ""


def test_parity_batches_use_real_images_when_given():
    x = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    data = ImageData(x, torch.zeros(5, dtype=torch.int64), ["a"], "five")
    batches, source = parity_batches(data, [0.5], [0.25], (1, 4, 4), parse_batch("1:8:64"), 37)
    assert [len(b) for b in batches] == [1, 37] and source.startswith("five")
    real = {tuple(np.round(v, 4).ravel()) for v in ((x.float() / 255 - 0.5) / 0.25).numpy()}
    assert {tuple(np.round(v, 4).ravel()) for v in np.concatenate(batches)} <= real
    static, src = parity_batches(None, [0.0], [1.0], (1, 4, 4), parse_batch("8"), 37, seed=3)
    assert [len(b) for b in static] == [8] and "noise" in src
    capped, _ = parity_batches(None, [0.0], [1.0], (1, 4, 4), parse_batch("2:4:16"), 37)
    assert [len(b) for b in capped] == [2, 16]  # sizes stay inside the profile


def test_parity_on_a_calibration_draw_uses_the_images_a_choice_from_all_of_them_would():
    """export decodes only its --calib-images draw of --calib-data: parity without --val
    still checks the images this seed picks from the whole set."""
    from kdtool.data import Draw, load_data

    data = load_data("digits")
    profile = parse_batch("1:32:256")
    for seed in (0, 5):
        whole, _ = parity_batches(data, [0.3], [0.37], (1, 8, 8), profile, 64, seed)
        drawn, source = parity_batches(data.subset(Draw(512, seed).indices(len(data))), [0.3],
                                       [0.37], (1, 8, 8), profile, 64, seed, drawn=True)
        assert all(np.array_equal(a, b) for a, b in zip(whole, drawn, strict=True))
        assert source == f"digits (512 images, drawn with seed {seed})"


def _graph(batch):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])
    return helper.make_graph([helper.make_node("Identity", ["input"], ["logits"])], "g", [x], [y])


def test_triton_config_text_dynamic_and_static():
    dynamic = config_text("m", "onnx", _graph("batch"), parse_batch("1:16:64"), labels=True)
    assert 'platform: "onnxruntime_onnx"' in dynamic and "max_batch_size: 64" in dynamic
    assert "dims: [ 3, 32, 32 ]" in dynamic and "dims: [ 10 ]" in dynamic
    assert "preferred_batch_size: [ 16 ]" in dynamic and "label_filename" in dynamic
    static = config_text("m", "plan", _graph(4), parse_batch("4"))
    assert 'platform: "tensorrt_plan"' in static and "max_batch_size: 0" in static
    assert "dims: [ 4, 3, 32, 32 ]" in static and "dynamic_batching" not in static
    assert "KIND_GPU" in static
    assert model_name("my student.v2") == "my_student.v2" and model_name("...") == "model"


def test_ort_runner_refuses_a_provider_it_does_not_have(tmp_path):
    import onnxruntime as ort

    from kdtool.export.runners import OrtRunner

    path = tmp_path / "id.onnx"
    onnx.save(
        helper.make_model(_graph("batch"), opset_imports=[helper.make_opsetid("", 18)]), str(path)
    )
    with OrtRunner(path) as runner:
        assert runner.describe()["providers"] == ["CPUExecutionProvider"]
        assert runner.fixed_batch is None
        with pytest.raises(KdtoolError, match="no kdtool metadata"):
            _ = runner.info
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(KdtoolError, match=r"no CUDAExecutionProvider.*kdtool\[gpu\]"):
        OrtRunner(path, providers=("cuda",))
    with pytest.raises(KdtoolError, match="does not exist"):
        OrtRunner(tmp_path / "missing.onnx")


def test_a_timing_cache_the_user_named_is_replaced_only_when_it_was_one(tmp_path):
    from kdtool.export.engine import keep_timing_cache

    mine = tmp_path / "student.onnx"  # a mistyped --timing-cache naming someone's file
    mine.write_bytes(b"not a timing cache")
    assert not keep_timing_cache(mine, named_by_user=True, loaded=False, force=False)
    assert keep_timing_cache(mine, named_by_user=True, loaded=False, force=True)
    assert keep_timing_cache(mine, named_by_user=True, loaded=True, force=False)
    assert keep_timing_cache(tmp_path / "new.cache", named_by_user=True, loaded=False,
                             force=False)
    assert keep_timing_cache(mine, named_by_user=False, loaded=False, force=False)  # kdtool's


def test_the_benchmarked_torch_runner_is_nhwc_and_the_export_reference_is_left_alone(tmp_path):
    from kdtool.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
    from kdtool.export.runners import TorchRunner
    from kdtool.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    meta = ModelMeta(arch="resnet8", num_classes=10, in_chans=3, input_size=[16, 16],
                     mean=[0.5] * 3, std=[0.25] * 3)
    save_checkpoint(path, create_model("resnet8"), meta, force=False)
    runner = TorchRunner.from_checkpoint(path)  # what kdtool bench and predict run
    seen = []
    first = next(m for m in runner.model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda m, a, y: seen.append(
        a[0].is_contiguous(memory_format=torch.channels_last)))
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16), dtype=np.float32)
    model = load_checkpoint(path)[0].eval()
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.infer(x), expected, rtol=1e-4, atol=1e-5)
    assert seen == [True] and runner.describe()["memory_format"] == "channels_last"
    # The export's reference wraps the caller's model: it must not convert it in place.
    reference = TorchRunner(model)
    assert reference.describe()["memory_format"] == "contiguous"
    assert all(p.is_contiguous() for p in model.parameters())


def test_a_replaced_triton_model_survives_a_failed_swap(tmp_path, monkeypatch):
    """--force deletes the old model folder only once the new one is in place."""
    import os

    from kdtool.export import triton

    target, new = tmp_path / "m", tmp_path / ".m.new"
    for folder, text in ((target, "old"), (new, "new")):
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.onnx").write_text(text)
    real = os.replace

    def failing(src, dst):
        if Path(src) == new:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(triton.os, "replace", failing)
    with pytest.raises(OSError):
        triton._swap_in(new, target)
    assert (target / "1" / "model.onnx").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.new", "m"]  # nothing stranded
    monkeypatch.setattr(triton.os, "replace", real)
    triton._swap_in(new, target)
    assert (target / "1" / "model.onnx").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_checkpoint_handed_to_an_onnx_consumer_gets_the_commands_that_make_one():
    from kdtool.export.ort_session import LOAD_HINT, load_hint

    hint = load_hint("m/student.safetensors")
    assert hint.endswith("kdtool export m/student.safetensors --onnx m/student.onnx")
    # a plain state_dict cannot be exported as it is: convert comes first
    hint = load_hint("m/r18.pth")
    assert "plain PyTorch state_dict" in hint
    assert ("kdtool convert m/r18.pth --arch ARCH --out m/r18.safetensors, then kdtool export "
            "m/r18.safetensors --onnx m/r18.onnx") in hint
    assert load_hint("m/x.txt") == LOAD_HINT


def test_every_onnx_row_of_the_export_table_has_its_precision_step():
    """The export table names the ONNX formats; the pipeline's step table makes each."""
    from kdtool.export.formats import FORMATS, ONNX_FORMAT_BY_PRECISION
    from kdtool.export.pipeline import PRECISION_STEPS

    onnx_rows = {name for name, f in FORMATS.items() if f.suffix == ".onnx"}
    assert set(PRECISION_STEPS) == onnx_rows == set(ONNX_FORMAT_BY_PRECISION.values())
    assert PRECISION_STEPS["onnx"] is None  # FP32 is the checked export itself


@pytest.mark.parametrize("fails_at", ["builder", "parser"])
def test_an_int8_engine_build_that_fails_leaves_no_copy_of_its_graph(tmp_path, monkeypatch,
                                                                     fails_at):
    """An INT8 graph goes to TensorRT as a copy with float biases; a build that fails (or a
    killed one, whose copy is named as a temporary of the engine) leaves no copy behind."""
    import types

    import kdtool.export.engine as engine_mod
    import kdtool.export.formats as formats_mod
    import kdtool.export.precision as precision_mod
    from kdtool.io import temp_prefix

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])])
    onnx_path = tmp_path / "m.int8.onnx"
    onnx.save(helper.make_model(graph), str(onnx_path))

    class Refused(Exception):
        pass

    def builder(logger):
        if fails_at == "builder":
            raise Refused("no GPU for the builder")
        return types.SimpleNamespace(create_network=lambda flags: object())

    class Parser:
        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            assert Path(path).is_file() and Path(path).name.endswith(".tmp")
            raise Refused("parser crashed")

    trt = types.SimpleNamespace(__version__="10.9.0", Logger=lambda level: None, Builder=builder,
                                OnnxParser=Parser)
    trt.Logger.WARNING = 2
    monkeypatch.setattr(formats_mod, "require", lambda *a, **k: None)
    monkeypatch.setattr(engine_mod, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU")
    monkeypatch.setattr(precision_mod, "fold_bias_dequantize", lambda model: 1)
    engine_tmp = tmp_path / f"{temp_prefix('m.engine')}abc.tmp"  # as export passes it
    with pytest.raises(Refused):
        engine_mod.build_engine(onnx_path, engine_tmp, precision="int8",
                                profile=parse_batch("1:8:16"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx"]
