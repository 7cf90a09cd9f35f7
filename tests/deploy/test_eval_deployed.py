"""kdtool eval of an exported file: the deployed model's accuracy report, as deployed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def test_a_graph_that_disagrees_with_its_metadata_is_a_user_error(cli, tiny_onnx, tmp_path):
    """An edited ONNX (or an engine beside a re-exported ONNX) says 7 classes, returns 10."""
    import dataclasses

    import onnx

    from kdtool.export.metadata import read_info, write_info

    model = onnx.load(tiny_onnx)
    info = read_info(tiny_onnx)
    write_info(model, dataclasses.replace(info, num_classes=7,
                                          class_names=[str(i) for i in range(7)]))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    data = tmp_path / "seven.npz"
    np.savez(data, x=np.zeros((14, 8, 8), np.uint8), y=np.arange(14) % 7)
    r = cli("eval", bad, "--data", data)
    assert r.code == 1 and "Traceback" not in r.err
    assert f"'{bad}' returned logits of shape [14, 10]" in r.err
    assert "metadata says 7 classes" in r.err
