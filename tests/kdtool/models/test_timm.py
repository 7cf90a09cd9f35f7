"""timm classifiers as timm:NAME: built, converted from a user's state_dict, trained,
distilled from noise and exported like kdtool's own."""

from __future__ import annotations

import builtins

import pytest
import torch

from kdtool.checkpoint import load_checkpoint
from kdtool.errors import KdtoolError
from kdtool.models import count_params, create_model, model_spec

timm = pytest.importorskip("timm")


def test_a_timm_name_builds_with_its_pretrained_configs_input_and_normalisation():
    spec = model_spec("timm:resnet18")
    cfg = timm.models.get_pretrained_cfg("resnet18").to_dict()
    assert spec.family == "timm" and spec.input_size == tuple(cfg["input_size"][1:])
    assert spec.crop_fraction == cfg["crop_pct"] and spec.interpolation == cfg["interpolation"]
    assert spec.mean == tuple(cfg["mean"]) and spec.std == tuple(cfg["std"])
    model = create_model("timm:resnet18", num_classes=7, in_chans=1)
    assert count_params(model) == count_params(
        timm.create_model("resnet18", num_classes=7, in_chans=1))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 64, 64)).shape == (2, 7)


def test_a_mistyped_timm_name_suggests_and_a_missing_timm_says_how_to_install(monkeypatch):
    with pytest.raises(KdtoolError, match="did you mean 'resnet18'"):
        model_spec("timm:resnet81")
    from kdtool.models import timm_models

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    timm_models._names.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_timm)
    try:
        with pytest.raises(KdtoolError, match=r"need the timm package") as info:
            model_spec("timm:resnet18")
        assert "kdtool[timm]" in info.value.hint
    finally:
        monkeypatch.undo()
        timm_models._names.cache_clear()


def test_a_timm_state_dict_converts_with_the_configs_defaults(cli, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5)
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    # timm's training script wraps the weights, and DDP prefixes their names.
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3},
               tmp_path / "r10t.pth")
    out = tmp_path / "r10t.safetensors"
    r = cli("convert", tmp_path / "r10t.pth", "--arch", "timm:resnet10t", "--num-classes", "5",
            "--out", out, "--json")
    assert r.code == 0, r.err
    loaded, meta = load_checkpoint(out)
    cfg = timm.models.get_pretrained_cfg("resnet10t").to_dict()
    assert meta.arch == "timm:resnet10t" and meta.input_size == list(cfg["input_size"][1:])
    assert meta.mean == list(cfg["mean"]) and meta.std == list(cfg["std"])
    assert meta.crop_fraction == cfg["crop_pct"] and meta.interpolation == "bicubic"
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.slow  # train, distil and export: 17-18 s (-m slow); the mobilenetv3 test below
# keeps timm's fused BatchNormAct2d in the default suite
def test_a_timm_teacher_trains_distils_from_noise_and_exports(cli, tmp_path):
    # timm's own tiny test EfficientNet (100K parameters): its BatchNormAct2d layers are
    # what the method must treat as BatchNorm, and it trains in seconds.
    if "test_efficientnet" not in timm.list_models("test_*"):
        pytest.skip("this timm has no test_efficientnet (timm >= 1.0.10 has)")
    teacher, student = tmp_path / "teacher.safetensors", tmp_path / "student.safetensors"
    r = cli("train", "--arch", "timm:test_efficientnet", "--data", "digits", "--val",
            "digits:test", "--epochs", "4", "--out", teacher, "--json")
    assert r.code == 0, r.err
    assert r.json()["val_top1"] >= 90
    before = {k: v.clone() for k, v in load_checkpoint(teacher)[0].state_dict().items()}
    r = cli("distill", "--teacher", teacher, "--student", "cnn3", "--epochs", "4",
            "--iters-per-epoch", "30", "--schedule", "onecycle", "--lr", "0.01",
            "--val", "digits:test", "--val-every", "4", "--out", student, "--json")
    assert r.code == 0, r.err
    res = r.json()
    bn = [m for m in load_checkpoint(teacher)[0].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(type(m).__name__ == "BatchNormAct2d" for m in bn)
    # Every one of them normalises with the noise batch's statistics, which makes the
    # teacher's answers informative: 95.6% teacher, 92.2% student measured here.
    assert res["teacher_bn"]["bn_layers"] == len(bn)
    assert res["val_top1_current"] >= 85, res
    after = load_checkpoint(teacher)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    r = cli("export", teacher, "--out", tmp_path / "teacher.onnx", "--json")
    assert r.code == 0, r.err
    assert r.json()["parity"]["fp32"]["passed"]


def test_a_timm_mobilenetv3_calibrates_and_folds_its_fused_bn_activations(cli, tmp_path):
    student = tmp_path / "mnv3.safetensors"
    r = cli("train", "--arch", "timm:mobilenetv3_small_050", "--data", "digits", "--epochs",
            "1", "--out", student, "--json")
    assert r.code == 0, r.err
    unfolded, folded = tmp_path / "unfolded.safetensors", tmp_path / "folded.safetensors"
    args = ("--calib-data", "digits", "--batches", "4", "--batch-size", "16")
    r = cli("calibrate", student, *args, "--no-fold", "--out", unfolded, "--json")
    assert r.code == 0, r.err
    r = cli("calibrate", student, *args, "--out", folded, "--json")
    assert r.code == 0, r.err
    fold = r.json()["fold"]
    # Every BN folds into its conv, BatchNormAct2d's included, and the check scales with
    # the logits (these reach tens: float32 rounding alone moves them by ~1e-4).
    assert fold["into_prev"] == len(fold["layers"]) > 30 and fold["logit_scale"] > 1
    assert fold["max_abs_diff"] <= fold["tolerance"] * fold["logit_scale"]
    a, b = load_checkpoint(unfolded)[0].eval(), load_checkpoint(folded)[0].eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in b.modules())
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        ya, yb = a(x), b(x)
    scale = max(1.0, ya.abs().max().item())
    assert (ya - yb).abs().max().item() <= 1e-4 * scale
    assert torch.equal(ya.argmax(1), yb.argmax(1))


def test_models_lists_the_timm_names_a_pattern_matches(cli):
    r = cli("models", "--timm", "resnet1?t", "--json")
    assert r.code == 0, r.err
    rows = {m["name"]: m for m in r.json()["models"] if m["family"] == "timm"}
    assert sorted(rows) == ["timm:" + n for n in timm.list_models("resnet1?t")]
    assert "timm:resnet10t" in rows
    assert rows["timm:resnet10t"]["params"] == count_params(timm.create_model("resnet10t"))
    assert rows["timm:resnet10t"]["input_size"] == [176, 176]  # its pretrained config's
    r = cli("models", "--timm", "no_such_net*")
    assert r.code == 1 and "no timm model matches 'no_such_net*'" in r.err
