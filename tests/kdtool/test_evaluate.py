"""Evaluation: flip test-time augmentation (``kdtool eval --tta flip``), the accuracy report."""

from __future__ import annotations

import pytest
import torch

from kdtool.bn import batch_stats
from kdtool.checkpoint import load_checkpoint
from kdtool.data import ImageData, load_data
from kdtool.errors import KdtoolError
from kdtool.evaluate import accuracy_report, predict, wilson_interval


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
    # The digits teacher trained without flips (8 px images): flip TTA is flagged.
    assert "trained without flips" in r.err and "--tta none" in r.err
    plain = cli("eval", digits_teacher, "--data", "digits:test", "--json")
    assert plain.json()["tta"] == "none" and plain.json()["top1"] != res["top1"]
    assert "trained without flips" not in plain.err
    bad = cli("eval", digits_teacher, "--data", "digits:test", "--tta", "flp")
    assert bad.code == 1 and "did you mean 'flip'" in bad.err


def test_flip_tta_is_not_flagged_for_a_model_trained_with_flips(cli, digits_teacher,
                                                               tmp_path):
    from kdtool.checkpoint import load_checkpoint, save_checkpoint
    from kdtool.train import trained_with_flips

    assert trained_with_flips(None, [32, 32])
    assert not trained_with_flips(None, [8, 8])
    assert trained_with_flips(True, [8, 8])
    model, meta = load_checkpoint(digits_teacher)
    meta.stages["train"]["config"]["augment"] = True  # as --augment records it
    flipped = save_checkpoint(tmp_path / "f.safetensors", model, meta, force=False)
    r = cli("eval", flipped, "--data", "digits:test", "--tta", "flip", "--json")
    assert r.code == 0 and "trained without flips" not in r.err, r.err


def test_eval_current_bn_warns_when_the_data_is_smaller_than_a_batch(cli, digits_teacher):
    r = cli("eval", digits_teacher, "--data", "digits:test", "--bn", "current", "--json")
    assert r.code == 0 and "fewer than --batch-size 256" not in r.err  # 360 images
    r = cli("eval", digits_teacher, "--data", "digits:test", "--bn", "current", "--batch-size",
            "512", "--json")
    assert r.code == 0, r.err
    assert "has 360 images, fewer than --batch-size 512" in r.err
    assert r.json()["images"] == 360


@pytest.mark.parametrize(("correct", "n", "lo", "hi"), [
    (5, 10, 23.66, 76.34),  # textbook Wilson values
    (0, 10, 0.0, 27.75),  # stays inside 0-100%, unlike p +- 1.96 se
    (10, 10, 72.25, 100.0),
    (303, 360, 80.0, 87.6),
])
def test_the_top1_interval_is_wilsons(correct, n, lo, hi):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((lo, hi), abs=0.05)


def test_the_report_counts_images_and_gives_the_interval():
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])  # 3 of 4 right
    r = accuracy_report(logits, labels, ["cat", "dog"])
    assert r["top1"] == 75.0 and r["top1_ci95"] == list(wilson_interval(3, 4))
    assert r["per_class"] == pytest.approx({"cat": 200 / 3, "dog": 100.0})
    assert r["per_class_images"] == {"cat": 3, "dog": 1}


def test_eval_shows_the_interval_and_class_sizes(cli, digits_teacher):
    r = cli("eval", digits_teacher, "--data", "digits:test")
    assert r.code == 0 and "95% interval" in r.out and "images" in r.out
    j = cli("eval", digits_teacher, "--data", "digits:test", "--json").json()
    lo, hi = j["top1_ci95"]
    assert lo < j["top1"] < hi or j["top1"] == 100.0
    assert sum(j["per_class_images"].values()) == j["images"] == 360


def test_current_statistics_do_not_depend_on_a_class_sorted_order(digits_teacher):
    """Image folders load sorted by class; --bn current draws batches in a seeded random
    order, or a batch of one class would be normalised with statistics of that class."""
    from kdtool.evaluate import evaluate

    model, meta = load_checkpoint(digits_teacher)
    data = load_data("digits:test", channels=1)
    order = torch.argsort(data.y, stable=True)
    by_class = ImageData(data.x[order].contiguous(), data.y[order], data.class_names,
                         data.source)
    args = dict(batch_size=32, bn="current", seed=0)
    mixed = evaluate(model, data, meta.mean, meta.std, **args)["top1"]
    sorted_ = evaluate(model, by_class, meta.mean, meta.std, **args)["top1"]
    assert mixed > 90 and abs(sorted_ - mixed) <= 2.0, (mixed, sorted_)
    # what an unshuffled pass would do: each batch of one or two classes
    model.eval()
    with torch.no_grad(), batch_stats(model):
        x = (by_class.x.float() / 255 - meta.mean[0]) / meta.std[0]
        pred = torch.cat([model(x[i:i + 32]).argmax(1) for i in range(0, len(x), 32)])
    assert 100.0 * (pred == by_class.y).float().mean().item() < mixed - 20


def test_eval_runs_nhwc_and_scores_what_nchw_scores(cli, digits_teacher, monkeypatch):
    import kdtool.checkpoint

    seen, real = [], kdtool.checkpoint.load_checkpoint

    def spied(*a, **k):
        model, meta = real(*a, **k)
        conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        conv.register_forward_hook(lambda m, args, y: seen.append(
            args[0].is_contiguous(memory_format=torch.channels_last)))
        return model, meta

    monkeypatch.setattr(kdtool.checkpoint, "load_checkpoint", spied)
    r = cli("eval", digits_teacher, "--data", "digits:test", "--json")
    assert r.code == 0, r.err
    assert seen and all(seen)  # NHWC, PyTorch's faster layout on CPUs and GPUs
    model, meta = real(digits_teacher)
    logits, labels = predict(model, load_data("digits:test", channels=1), meta.mean, meta.std)
    assert r.json()["top1"] == 100.0 * int((logits.argmax(1) == labels).sum()) / len(labels)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_a_last_batch_of_one_image_joins_the_batch_before_it(digits_teacher, tta):
    """360 images at batch 359 (as 257 --val images at distill's batch 256): one image has no
    batch statistics, so it runs with the batch before it, which here is all the images."""
    model, meta = load_checkpoint(digits_teacher)
    data = load_data("digits:test", channels=1)
    args = dict(mean=meta.mean, std=meta.std, bn="current", seed=3, tta=tta)
    ragged, labels = predict(model, data, batch_size=359, **args)
    whole, _ = predict(model, data, batch_size=360, **args)
    torch.testing.assert_close(ragged, whole, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, data.y)
    with pytest.raises(KdtoolError, match="needs 2 or more images, and 'digits:test' has 1"):
        predict(model, data.subset(slice(0, 1)), batch_size=256, **args)
    # only a last batch joins the one before: a batch size of 1 is refused, not run as one
    with pytest.raises(KdtoolError, match="a batch of 1 image has none"):
        predict(model, data, batch_size=1, **args)


def test_distill_validates_on_a_set_one_image_over_a_batch(digits_teacher, tmp_path):
    """--val of 257 images at the validation batch of 256 once failed after an epoch."""
    import numpy as np

    from kdtool.distill.loop import DistillConfig, DistillRun

    test = load_data("digits:test")
    np.savez(tmp_path / "val257.npz", x=test.x[:257, 0].numpy(), y=test.y[:257].numpy())
    cfg = DistillConfig(teacher=str(digits_teacher), student="tiny_cnn", epochs=1,
                        iters_per_epoch=2, batch_size=32, val=str(tmp_path / "val257.npz"))
    r = DistillRun(cfg, tmp_path / "s.safetensors").run()
    assert r["val_images"] == 257 and 0 <= r["val_top1_current"] <= 100
