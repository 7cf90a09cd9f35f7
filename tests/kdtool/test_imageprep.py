"""Fitting images to a model's input: stretch, or torchvision's (timm's) resize + centre crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from kdtool.checkpoint import ModelMeta
from kdtool.data import load_data, load_for_model
from kdtool.errors import KdtoolError
from kdtool.imageprep import STRETCH, Fit, describe_resize, parse_resize, to_array
from kdtool.models import model_spec


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("how", ["bilinear", "bicubic"])
@pytest.mark.parametrize("fraction", [0.875, 224 / 232, 1.0, 0.5])
@pytest.mark.parametrize("w,h", [(40, 30), (30, 40), (27, 27), (13, 9), (300, 256)])
def test_crop_is_torchvision_resize_then_center_crop(w, h, fraction, how):
    side = 24
    im = _image(w, h)
    mode = transforms.InterpolationMode(how)
    tv = transforms.Compose([transforms.Resize(math.floor(side / fraction + 1e-9), mode),
                             transforms.CenterCrop(side)])
    np.testing.assert_array_equal(np.asarray(Fit(fraction, how).apply(im, (side, side))),
                                  np.asarray(tv(im)))


@pytest.mark.parametrize("how", ["bilinear", "bicubic"])
@pytest.mark.parametrize("fraction", [0.875, 0.95])
@pytest.mark.parametrize("w,h", [(100, 75), (40, 30), (75, 100), (64, 48), (33, 17)])
def test_crop_to_a_non_square_input_is_timms_eval_transform(w, h, fraction, how):
    # timm keeps the aspect ratio with rounded sides here, where a square input truncates:
    # a one-pixel shift of the crop for a 48x64 model on a 100x75 photo otherwise.
    from timm.data import create_transform

    size = (48, 64)
    ref = create_transform(size, interpolation=how, crop_pct=fraction)
    ref.transforms = ref.transforms[:2]  # resize and crop; not to-tensor and normalise
    im = _image(w, h)
    np.testing.assert_array_equal(np.asarray(Fit(fraction, how).apply(im, size)),
                                  np.asarray(ref(im)))


def test_crop_of_a_wide_input_covers_both_sides():
    out = Fit(0.5).apply(_image(50, 50), (12, 24))  # must cover 24 x 48, keep the centre
    assert out.size == (24, 12)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(_image(50, 50).resize((48, 48), Image.BILINEAR)
                                             .crop((12, 18, 36, 30))))


def test_stretch_is_a_plain_resize_and_keeps_right_sized_images():
    im = _image(40, 30)
    np.testing.assert_array_equal(np.asarray(STRETCH.apply(im, (16, 16))),
                                  np.asarray(im.resize((16, 16), Image.BILINEAR)))
    np.testing.assert_array_equal(np.asarray(Fit(None, "bicubic").apply(im, (16, 16))),
                                  np.asarray(im.resize((16, 16), Image.BICUBIC)))
    assert STRETCH.apply(im, (30, 40)) is im
    same = _image(24, 24)
    np.testing.assert_array_equal(np.asarray(Fit(1.0).apply(same, (24, 24))), np.asarray(same))
    assert to_array(im.convert("L"), None, (8, 8), Fit(0.875)).shape == (8, 8, 1)
    with pytest.raises(KdtoolError, match="did you mean 'bicubic'"):
        Fit(None, "bicubc")
    assert Fit(0.875, "bicubic").describe() == "--resize crop:0.875 --interpolation bicubic"


@pytest.mark.parametrize("text,want", [("stretch", None), ("crop", 1.0), ("crop:0.875", 0.875),
                                       (" crop:1 ", 1.0)])
def test_parse_resize(text, want):
    assert parse_resize(text) == want
    assert parse_resize(describe_resize(want)) == want


@pytest.mark.parametrize("text,fragment", [("strech", "did you mean 'stretch'"),
                                           ("crop:0", "(0, 1]"), ("crop:1.5", "(0, 1]"),
                                           ("crop:abc", "(0, 1]"), ("crop:nan", "(0, 1]"),
                                           ("stretch:0.5", "unknown --resize"),
                                           ("zoom", "crop:0.875")])
def test_parse_resize_errors(text, fragment):
    with pytest.raises(KdtoolError) as e:
        parse_resize(text)
    assert fragment in str(e.value)


def _mixed_folder(root):
    for cls, sizes in {"a": [(40, 30), (30, 44)], "b": [(36, 36), (50, 20)]}.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            _image(w, h, seed=i + ord(cls)).save(root / cls / f"{i}.png")
    return root


def test_load_data_fits_mixed_sizes_and_caches_each_rule_apart(tmp_path):
    root = _mixed_folder(tmp_path / "imgs")
    # sizes as a viewer gives them: a/0.png is 40 wide and 30 high (it read "30x40")
    with pytest.raises(KdtoolError, match="differ in size: a/0.png is 40 wide x 30 high, "
                                          "a/1.png 30 wide x 44 high"):
        load_data(str(root))
    crop = load_data(str(root), image_size=(16, 16), fit=Fit(0.875))
    stretch = load_data(str(root), image_size=(16, 16))
    assert crop.x.shape == stretch.x.shape == (4, 3, 16, 16)
    assert not np.array_equal(crop.x.numpy(), stretch.x.numpy())  # not one cache entry
    first = Image.open(root / "a" / "0.png")
    np.testing.assert_array_equal(crop.x[0].permute(1, 2, 0).numpy(),
                                  np.asarray(Fit(0.875).apply(first, (16, 16))))
    again = load_data(str(root), image_size=(16, 16), fit=Fit(0.875))  # from the cache
    np.testing.assert_array_equal(again.x.numpy(), crop.x.numpy())
    # Arrays (npz, digits) take the same path as files.
    np.savez(tmp_path / "d.npz", x=np.stack([np.asarray(first)]), y=np.array([0]))
    npz = load_data(str(tmp_path / "d.npz"), image_size=(16, 16), fit=Fit(0.875))
    np.testing.assert_array_equal(npz.x[0].numpy(), crop.x[0].numpy())
    meta = ModelMeta("tiny_cnn", 2, 3, [16, 16], [0.5] * 3, [0.5] * 3, crop_fraction=0.875)
    np.testing.assert_array_equal(load_for_model(str(root), meta).x.numpy(), crop.x.numpy())
    bicubic = load_data(str(root), image_size=(16, 16), fit=Fit(0.875, "bicubic"))
    assert not np.array_equal(bicubic.x.numpy(), crop.x.numpy())


def test_torchvision_archs_default_to_their_weights_evaluation_transform():
    r18 = model_spec("tv:resnet18")
    assert (r18.crop_fraction, r18.interpolation) == (0.875, "bilinear")  # 256 -> 224
    r50 = model_spec("tv:resnet50")
    assert r50.input_size == (224, 224) and math.floor(224 / r50.crop_fraction + 1e-9) == 232
    b3 = model_spec("tv:efficientnet_b3")
    assert b3.input_size == (300, 300) and b3.interpolation == "bicubic"
    assert model_spec("resnet18").crop_fraction is None  # kdtool's CIFAR nets stretch


def test_metadata_records_and_validates_the_rule():
    meta = ModelMeta("tiny_cnn", 2, 3, [16, 16], [0.5] * 3, [0.5] * 3, crop_fraction=0.875)
    assert ModelMeta.from_json(meta.to_json(), "m").crop_fraction == 0.875
    old = meta.to_json().replace(', "crop_fraction": 0.875, "interpolation": "bilinear"', "")
    assert "crop_fraction" not in old  # written before the fields existed
    assert Fit.of(ModelMeta.from_json(old, "m")) == STRETCH
    with pytest.raises(KdtoolError, match=r"crop_fraction: .* in \(0, 1\], got 1.5"):
        ModelMeta.from_json(meta.to_json().replace("0.875", "1.5"), "m")
    with pytest.raises(KdtoolError, match="unknown interpolation 'lanczos'"):
        ModelMeta.from_json(meta.to_json().replace('"bilinear"', '"lanczos"'), "m")


# ----------------------------------------------------------------------------- the CLI


@pytest.fixture
def tiny_pt(tmp_path):
    import torch

    from kdtool.models import create_model

    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(create_model("tiny_cnn", num_classes=2).state_dict(), path)
    return path


def _convert(cli, src, out, *extra):
    return cli("convert", src, "--arch", "tiny_cnn", "--num-classes", "2", "--mean",
               "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--out", out, *extra)


def test_convert_records_the_rule_and_eval_fits_mixed_sizes_with_it(cli, tmp_path, tiny_pt):
    root = _mixed_folder(tmp_path / "imgs")
    ckpt = tmp_path / "tiny.safetensors"
    r = _convert(cli, tiny_pt, ckpt, "--resize", "crop:0.875", "--interpolation", "bicubic",
                 "--class-names", "cat,dog")
    assert r.code == 0, r.err
    info = cli("info", ckpt, "--json").json()
    assert info["crop_fraction"] == 0.875 and info["interpolation"] == "bicubic"
    assert info["class_names"] == ["cat", "dog"]
    assert "--resize crop:0.875 --interpolation" in cli("info", ckpt).out
    r = cli("eval", ckpt, "--data", root, "--json")
    assert r.code == 0, r.err
    assert r.json()["images"] == 4
    # A kdtool architecture stretches unless told otherwise.
    _convert(cli, tiny_pt, tmp_path / "plain.safetensors")
    assert cli("info", tmp_path / "plain.safetensors", "--json").json()["crop_fraction"] is None


def test_convert_class_names_from_files_and_imagenet(cli, tmp_path, tiny_pt):
    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    (tmp_path / "names.json").write_text('["cat", "dog"]')
    for src in ("names.txt", "names.json"):
        out = tmp_path / f"{src}.safetensors"
        assert _convert(cli, tiny_pt, out, "--class-names", tmp_path / src).code == 0
        assert cli("info", out, "--json").json()["class_names"] == ["cat", "dog"]
    r = _convert(cli, tiny_pt, tmp_path / "x.safetensors", "--class-names", "imagenet")
    assert r.code == 1 and "gives 1000 names for 2 classes" in r.err
    assert "Traceback" not in r.err
    (tmp_path / "bad.json").write_text('{"0": "cat"}')
    r = _convert(cli, tiny_pt, tmp_path / "x.safetensors", "--class-names", tmp_path / "bad.json")
    assert r.code == 1 and "JSON list of strings" in r.err
    # a repeated name: eval would score one class's folder against the other class
    (tmp_path / "twice.txt").write_text("cat\ncat\n")
    for names in ("cat,cat", tmp_path / "twice.txt"):
        r = _convert(cli, tiny_pt, tmp_path / "x.safetensors", "--class-names", names)
        assert r.code == 1 and "names class 'cat' twice" in r.err, r.err
    r = _convert(cli, tiny_pt, tmp_path / "x.safetensors", "--resize", "crop:2")
    assert r.code == 1 and "(0, 1]" in r.err
    r = _convert(cli, tiny_pt, tmp_path / "x.safetensors", "--interpolation", "bicubik")
    assert r.code == 1 and "did you mean 'bicubic'" in r.err
    # A flag mistake is named before an existing --out is: fixing it is the first step.
    r = cli("convert", tiny_pt, "--arch", "tiny_cnn", "--mean", "0.5", "--out",
            tmp_path / "names.txt.safetensors")
    assert r.code == 1 and "--std" in r.err and "exists" not in r.err, r.err


def test_imagenet_names_for_a_torchvision_teacher(cli, tmp_path):
    import torch
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    out = tmp_path / "teacher.safetensors"
    r = cli("convert", path, "--arch", "tv:resnet18", "--num-classes", "1000", "--class-names",
            "imagenet", "--out", out)
    assert r.code == 0, r.err
    info = cli("info", out, "--json").json()
    assert info["class_names"][:2] == ["tench", "goldfish"] and len(info["class_names"]) == 1000
    assert info["crop_fraction"] == 0.875  # torchvision's resize 256 / crop 224
    assert "every image, even one already 224x224, is resized to cover 256x256" in r.err
    # Trained at another size (CIFAR's 32): its images were seen whole, as kdtool train
    # sees them, not cropped by a rule made for the published weights at 224.
    r = cli("convert", path, "--arch", "tv:resnet18", "--num-classes", "1000", "--image-size",
            "32", "--out", tmp_path / "c32.safetensors")
    assert r.code == 0, r.err
    assert cli("info", tmp_path / "c32.safetensors", "--json").json()["crop_fraction"] is None
    assert "images already 32x32 are used as they are" in r.err
    shown = cli("info", tmp_path / "c32.safetensors").out
    assert "used as they are" in shown and "None" not in shown  # a converted file has no seed
    assert "used as they are; bilinear)" in " ".join(shown.split())  # torchvision's resize
    r = cli("convert", path, "--arch", "tv:resnet18", "--num-classes", "1000", "--image-size",
            "32", "--resize", "crop:0.875", "--out", tmp_path / "crop32.safetensors")
    assert cli("info", tmp_path / "crop32.safetensors", "--json").json()["crop_fraction"] == 0.875
    assert "resized to cover 36x36 and centre-cropped to 32x32" in r.err


def test_the_rule_travels_from_train_through_distill_to_onnx(cli, tmp_path):
    from kdtool.export.metadata import read_info

    root = _mixed_folder(tmp_path / "imgs")
    teacher, student = tmp_path / "t.safetensors", tmp_path / "s.safetensors"
    r = cli("train", "--arch", "tiny_cnn", "--data", root, "--val", root, "--image-size", "16",
            "--resize", "crop", "--interpolation", "bicubic", "--epochs", "1", "--batch-size",
            "4", "--out", teacher, "--json")
    assert r.code == 0, r.err
    assert cli("info", teacher, "--json").json()["crop_fraction"] == 1.0
    r = cli("distill", "--teacher", teacher, "--student", "tiny_cnn", "--epochs", "1",
            "--iters-per-epoch", "2", "--batch-size", "8", "--val", root, "--out", student,
            "--json")
    assert r.code == 0, r.err
    assert cli("info", student, "--json").json()["crop_fraction"] == 1.0
    calibrated = tmp_path / "s.cal.safetensors"
    r = cli("calibrate", student, "--calib-data", root, "--image-size", "16", "--batches", "1",
            "--batch-size", "4", "--out", calibrated, "--json")
    assert r.code == 0, r.err
    assert cli("info", calibrated, "--json").json()["crop_fraction"] == 1.0
    onnx = tmp_path / "s.onnx"
    r = cli("export", calibrated, "--out", onnx, "--val", root, "--json")  # --out: --onnx
    assert r.code == 0, r.err
    assert Fit.of(read_info(onnx)) == Fit(1.0, "bicubic")


def test_labels_follow_the_models_class_names(cli, tmp_path):
    """A folder holding some of the classes, or all in another order, is labelled by name."""
    import torch

    from kdtool.data import match_classes
    from kdtool.models import create_model

    model = create_model("tiny_cnn", num_classes=3)
    state = model.state_dict()
    state["linear.weight"].zero_()
    state["linear.bias"].copy_(torch.tensor([0.0, 10.0, 0.0]))  # always answers class 1
    torch.save(state, tmp_path / "ant.pt")
    ckpt = tmp_path / "ant.safetensors"
    assert cli("convert", tmp_path / "ant.pt", "--arch", "tiny_cnn", "--num-classes", "3",
               "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--class-names",
               "zebra,ant,bee", "--out", ckpt).code == 0
    root = tmp_path / "some"
    for name in ("ant", "zebra"):  # sorted, the folder would label ant 0 and zebra 1
        (root / name).mkdir(parents=True)
        for i in range(2):
            _image(8, 8, seed=i).save(root / name / f"{i}.png")
    r = cli("eval", ckpt, "--data", root, "--json")
    assert r.code == 0, r.err
    assert r.json()["per_class"] == {"zebra": 0.0, "ant": 100.0} and r.json()["top1"] == 50.0
    data = load_data(str(root))
    assert match_classes(data, ["ant", "zebra"]) is data  # same names, same order
    assert match_classes(data, ["cat", "dog"]) is data  # not the model's names: by index
    assert match_classes(data, []) is data
    assert match_classes(data, ["zebra", "ant", "bee"]).y.tolist() == [1, 1, 0, 0]


def _photo_with_turn(upright_im: Image.Image, path, orientation: int = 6) -> None:
    """``upright_im`` saved as a phone saves it: pixels as the sensor read them, plus the EXIF
    orientation that turns them upright (6: rotate 90 degrees clockwise to display)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright_im.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    from types import SimpleNamespace

    from kdtool.deploy.server.images import decode, preprocess

    upright_im = _image(12, 8)  # wide: a sideways copy is 8 x 12 and differs
    (tmp_path / "a").mkdir()
    upright_im.save(tmp_path / "a" / "upright.png")
    _photo_with_turn(upright_im, tmp_path / "a" / "turned.png")
    want = np.asarray(upright_im)
    np.testing.assert_array_equal(to_array(Image.open(tmp_path / "a" / "turned.png"), 3, None),
                                  want)
    # Data loading (train, eval, calibrate, export) turns it too: same size as the upright one.
    data = load_data(str(tmp_path))
    assert data.x.shape == (2, 3, 8, 12)
    np.testing.assert_array_equal(data.x[0].numpy(), data.x[1].numpy())
    # ... and so do the server and predict (one preprocess), from the request's bytes.
    info = SimpleNamespace(in_chans=3, input_size=[8, 12], crop_fraction=None,
                           interpolation="bilinear", mean=[0.0] * 3, std=[1 / 255] * 3,
                           layout="NHWC")
    served = preprocess(decode((tmp_path / "a" / "turned.png").read_bytes()), info, np.float32)
    np.testing.assert_allclose(served, want.astype(np.float32), atol=1e-3)
    # Mirrored orientations (2, 4, 5, 7) and a tag of 1 are honoured as well.
    for orientation, undo in [(1, None), (2, Image.Transpose.FLIP_LEFT_RIGHT),
                              (3, Image.Transpose.ROTATE_180)]:
        exif = Image.Exif()
        exif[0x0112] = orientation
        stored = upright_im.transpose(undo) if undo is not None else upright_im
        stored.save(tmp_path / f"o{orientation}.png", exif=exif)
        np.testing.assert_array_equal(
            to_array(Image.open(tmp_path / f"o{orientation}.png"), 3, None), want)
