"""kdtool eval of an exported file: the deployed model's accuracy report, as deployed."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from kdtool.data import load_data


def _digits_test_normalised():
    data = load_data("digits:test")
    x = (data.x.float().numpy() / 255 - 0.5) / 0.25  # the ONNX fixtures' normalisation
    return x.astype(np.float32), data.y.numpy()


def test_an_exported_onnx_scores_what_its_checkpoint_scores(cli, digits_teacher, tmp_path,
                                                            monkeypatch):
    onnx_path = tmp_path / "teacher.onnx"
    assert cli("export", digits_teacher, "--out", onnx_path).code == 0
    ref = cli("eval", digits_teacher, "--data", "digits:test", "--json").json()
    monkeypatch.setenv("KDTOOL_PROGRESS", "lines")  # its batches show, as a checkpoint's do
    r = cli("eval", onnx_path, "--data", "digits:test", "--batch-size", "64", "--json")
    assert r.code == 0, r.err
    assert "evaluate  100% 6/6 batch" in r.err, r.err
    got = r.json()
    assert got["backend"] == "ort-cpu" and got["bn"] == "as exported"
    assert got["images"] == ref["images"] == 360
    assert abs(got["top1"] - ref["top1"]) <= 100 / 360 + 1e-9  # at most one image flips
    assert got["per_class_images"] == ref["per_class_images"]
    assert got["per_class"].keys() == ref["per_class"].keys()
    assert got["top1_ci95"][0] < got["top1"] < got["top1_ci95"][1]


def test_limit_scores_a_seeded_draw_of_the_images_for_a_checkpoint_and_its_onnx(
        cli, digits_teacher, tmp_path, decoded, digits_pngs):
    from kdtool.data import Draw

    onnx_path = tmp_path / "teacher.onnx"
    assert cli("export", digits_teacher, "--out", onnx_path).code == 0
    test = load_data("digits:test")
    picked = Draw(50, 7).indices(len(test))
    per_class = {str(c): int((test.y[picked] == c).sum()) for c in range(10)}
    for model in (digits_teacher, onnx_path):
        r = cli("eval", model, "--data", "digits:test", "--limit", "50", "--seed", "7", "--json")
        assert r.code == 0, r.err
        got = r.json()
        assert got["images"] == 50 and got["limit"] == 50 and got["seed"] == 7
        # the very images of the draw (their classes), scored by each
        assert {k: v for k, v in got["per_class_images"].items() if v} == \
            {k: v for k, v in per_class.items() if v}
    other = cli("eval", onnx_path, "--data", "digits:test", "--limit", "50", "--seed", "8",
                "--json").json()["per_class_images"]
    assert other != got["per_class_images"]
    # A folder decodes only the images drawn, and says how they were chosen.
    folder = digits_pngs(300, labelled=True)
    decoded.clear()
    r = cli("eval", digits_teacher, "--data", folder, "--limit", "40", "--no-per-class")
    assert r.code == 0, r.err
    assert decoded == [40] and "40 (a random 40, --seed 0)" in r.out
    r = cli("eval", onnx_path, "--data", "digits:test", "--limit", "0")
    assert r.code == 1 and "--limit must be >= 1, got 0" in r.err


def test_a_static_batch_graph_is_scored_on_every_image_with_and_without_flip_tta(
        cli, static_onnx, offline):
    x, y = _digits_test_normalised()
    plain = offline(static_onnx, x)
    mirrored = offline(static_onnx, x[..., ::-1].copy())
    for tta, logits in (("none", plain), ("flip", (plain + mirrored) / 2)):
        r = cli("eval", static_onnx, "--data", "digits:test", "--tta", tta, "--json")
        assert r.code == 0, r.err
        res = r.json()
        assert res["batch_size"] == 4 and res["images"] == 360  # 90 whole batches of 4
        assert res["top1"] == pytest.approx(100 * float((logits.argmax(1) == y).mean()))
        per_class = {str(c): 100 * float((logits.argmax(1)[y == c] == c).mean())
                     for c in range(10)}
        assert res["per_class"] == pytest.approx(per_class)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bn", "current"], "an exported graph whose BatchNorm is fixed"),
        (["--mean", "0.5", "--std", "0.2"], "--mean describes a plain state_dict"),
        (["--num-classes", "10"], "drop --num-classes"),
        (["--device", "cuda:1"], "cuda:1"),
    ],
)
def test_options_an_exported_file_cannot_take_are_refused(cli, tiny_onnx, args, message):
    if args[-1] == "cuda:1" and torch.cuda.device_count() > 1:
        pytest.skip("this machine has a second GPU")
    r = cli("eval", tiny_onnx, "--data", "digits:test", *args)
    assert r.code == 1 and message in r.err and "Traceback" not in r.err, r.err


def _edited(tiny_onnx, path, **fields):
    """tiny_onnx with some kdtool metadata fields replaced (a hand-edited file)."""
    import dataclasses

    import onnx

    from kdtool.export.metadata import ONNX_META_KEY, read_info

    model = onnx.load(tiny_onnx)
    info = dataclasses.replace(read_info(tiny_onnx), **fields)
    for p in model.metadata_props:  # not write_info, which validates what it writes
        if p.key == ONNX_META_KEY:
            p.value = info.to_json()
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_classes": 7, "class_names": [str(i) for i in range(7)]},
     "the graph's output is [N, 10], the metadata says 7 classes"),
    ({"input_size": [16, 16]},
     "the graph's input is [N, 1, 8, 8], the metadata's NCHW input is [N, 1, 16, 16]"),
    ({"std": [0.0]}, "std must be positive"),
    ({"mean": [float("nan")]}, "mean/std must be finite numbers"),
])
def test_a_graph_that_disagrees_with_its_metadata_is_refused_by_every_reader(
        cli, tiny_onnx, tmp_path, fields, message):
    """An edited ONNX (or metadata copied onto another graph) would otherwise give NaN
    probabilities, an IndexError, an ONNX Runtime traceback or a 500 from the server."""
    from kdtool.deploy.server.model import OnnxModel
    from kdtool.errors import KdtoolError

    bad = _edited(tiny_onnx, tmp_path / "bad.onnx", **fields)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    for args in (["eval", bad, "--data", "digits:test"], ["predict", bad, image],
                 ["info", bad], ["bench", bad, "--batch", "1", "--min-time", "0.01"]):
        r = cli(*args)
        assert r.code == 1 and "Traceback" not in r.err, (args, r.err)
        assert message in " ".join(r.err.split()), (args, r.err)
    with pytest.raises(KdtoolError, match=re.escape(message)):
        OnnxModel(bad, threads=1)


def test_int8_eval_and_predict_say_when_their_figures_are_not_this_cpus_plain_ort(
        cli, tiny_onnx, tmp_path, monkeypatch):
    """On x86 without VNNI kdtool runs int8 weights as uint8 (exact); a plain ONNX Runtime
    session there saturates, so an eval figure must say whose numbers it is."""
    import onnx

    import kdtool.export.cpu_int8 as cpu_int8
    from kdtool.export.metadata import read_info, write_info
    from kdtool.export.precision import quantize_int8

    calib = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    path = tmp_path / "tiny.int8.onnx"
    quantize_int8(tiny_onnx, path, calib, input_name="input", batch_size=16)
    proto = onnx.load(str(path))
    info = read_info(tiny_onnx)
    info.precision = "int8"
    write_info(proto, info)
    onnx.save(proto, str(path))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    for exact in (False, True):
        monkeypatch.setattr(cpu_int8, "int8_weights_exact", lambda exact=exact: exact)
        for args in (["eval", path, "--data", "digits:test"], ["predict", path, image]):
            r = cli(*args, "--json")
            assert r.code == 0, r.err
            caveat = r.json().get("cpu_caveat")
            assert (caveat is None) is exact, (args, caveat)
            if not exact:
                assert "weights run as uint8" in caveat and "plain ONNX Runtime" in caveat
                assert "note: " in r.err


def test_info_of_a_tensorrt_engine_shows_the_metadata_kept_beside_it(cli, tiny_onnx, tmp_path):
    import shutil

    shutil.copy(tiny_onnx, tmp_path / "tiny.onnx")
    (tmp_path / "tiny.engine").write_bytes(b"\x00" * 64)  # info never deserializes it
    r = cli("info", tmp_path / "tiny.engine", "--json")
    assert r.code == 0, r.err
    got = r.json()
    assert got["format"] == "tensorrt" and got["bytes"] == 64 and got["num_classes"] == 10
    r = cli("info", tmp_path / "tiny.engine")
    assert "TensorRT engine built from ONNX" in r.out
    (tmp_path / "lone.plan").write_bytes(b"\x00" * 64)
    r = cli("info", tmp_path / "lone.plan")
    assert r.code == 1 and "has no kdtool metadata next to it" in r.err, r.err


@pytest.mark.parametrize("fixture", ["tiny_onnx", "static_onnx"])
def test_a_folder_too_large_to_hold_scores_a_chunk_at_a_time(cli, request, digits_pngs,
                                                             monkeypatch, decoded, fixture):
    import kdtool.data as data_mod

    onnx_path = request.getfixturevalue(fixture)  # static_onnx: batches of 4, the last padded
    folder = digits_pngs(37, labelled=True)
    args = ("eval", onnx_path, "--data", folder, "--batch-size", "4", "--json")
    whole = cli(*args).json()
    monkeypatch.setattr(data_mod, "STREAM_ABOVE_BYTES", 0)
    monkeypatch.setattr(data_mod, "CHUNK_BYTES", 2 * 4 * 64)  # two batches of 8x8 grey
    decoded.clear()
    r = cli(*args)
    assert r.code == 0, r.err
    assert r.json() == whole and whole["images"] == 37
    assert decoded == [8, 8, 8, 8, 5]
