"""Evaluation with flip test-time augmentation (``kdtool eval --tta flip``)."""

from __future__ import annotations

import pytest
import torch

from kdtool.checkpoint import load_checkpoint
from kdtool.data import ImageData, load_data
from kdtool.evaluate import predict


def _mirrored(data: ImageData) -> ImageData:
    return ImageData(data.x.flip(-1).contiguous(), data.y, data.class_names, data.source)


@pytest.mark.parametrize("bn", ["running", "current"])
def test_flip_tta_is_the_mean_of_the_image_and_its_mirror(digits_teacher, bn):
    model, meta = load_checkpoint(digits_teacher)
    data = load_data("digits:test", channels=1)
    args = dict(mean=meta.mean, std=meta.std, batch_size=64, bn=bn, seed=3)
    plain, labels = predict(model, data, **args)
    mirror, _ = predict(model, _mirrored(data), **args)
    tta, tta_labels = predict(model, data, tta="flip", **args)
    assert torch.equal(labels, tta_labels)
    torch.testing.assert_close(tta, (plain + mirror) / 2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tta, plain)  # digits are not mirror-symmetric


def test_flip_tta_leaves_mirror_symmetric_images_unchanged(digits_teacher):
    model, meta = load_checkpoint(digits_teacher)
    data = load_data("digits:test", channels=1)
    sym = data.x.clone()
    sym[..., 4:] = sym[..., :4].flip(-1)  # each 8-px row reads the same both ways
    data = ImageData(sym, data.y, data.class_names, data.source)
    plain, _ = predict(model, data, meta.mean, meta.std)
    tta, _ = predict(model, data, meta.mean, meta.std, tta="flip")
    assert torch.equal(plain, tta)


def test_eval_cli_reports_tta_and_suggests_on_a_typo(cli, digits_teacher):
    r = cli("eval", digits_teacher, "--data", "digits:test", "--tta", "flip", "--json")
    assert r.code == 0, r.err
    res = r.json()
    assert res["tta"] == "flip" and 0 < res["top1"] <= 100
    plain = cli("eval", digits_teacher, "--data", "digits:test", "--json").json()
    assert plain["tta"] == "none" and plain["top1"] != res["top1"]
    bad = cli("eval", digits_teacher, "--data", "digits:test", "--tta", "flp")
    assert bad.code == 1 and "did you mean 'flip'" in bad.err


def test_eval_current_bn_warns_when_the_data_is_smaller_than_a_batch(cli, digits_teacher):
    r = cli("eval", digits_teacher, "--data", "digits:test", "--bn", "current", "--json")
    assert r.code == 0 and "fewer than --batch-size 256" not in r.err  # 360 images
    r = cli("eval", digits_teacher, "--data", "digits:test", "--bn", "current", "--batch-size",
            "512", "--json")
    assert r.code == 0, r.err
    assert "has 360 images, fewer than --batch-size 512" in r.err
    assert r.json()["images"] == 360
