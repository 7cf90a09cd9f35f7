"""The model zoo: every architecture builds, runs and has its published size."""

from __future__ import annotations

import pytest
import torch

from kdtool.errors import KdtoolError
from kdtool.models import (
    architecture_params,
    count_params,
    create_model,
    list_models,
    model_spec,
)

# Reference counts for 10 classes, 3 input channels.  resnet18/34, mobilenetv2 and
# densenet121 match kuangliu/pytorch-cifar, wrn* match xternalz/WideResNet-pytorch;
# densenet169, resnet20 and resnet8 (option-B shortcuts) were measured from the
# faithful architectures.
PARAM_COUNTS = {
    "resnet8": 78_042,
    "resnet18": 11_173_962,
    "resnet20": 272_474,
    "resnet34": 21_282_122,
    "mobilenetv2": 2_296_922,
    "wrn16_8": 10_961_370,
    "wrn28_10": 36_479_194,
    "densenet121": 6_956_298,
    "densenet169": 12_493_322,
}


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_registry_lists_every_family():
    families = {model_spec(n).family for n in list_models()}
    assert families == {"resnet", "mobilenet", "wide_resnet", "densenet", "test"}
    assert set(PARAM_COUNTS) <= set(list_models())
    assert "tiny_cnn" not in list_models(include_test=False)


@pytest.mark.parametrize("name", list_models())
def test_builds_and_forwards(name):
    model = create_model(name)
    if name in PARAM_COUNTS:
        assert count_params(model) == PARAM_COUNTS[name]
    assert _forward(model, torch.randn(2, 3, 32, 32)).shape == (2, 10)
    spec = model_spec(name)
    assert spec.name == name and spec.input_size == (32, 32) and spec.description


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "tiny_cnn"])
def test_small_grayscale_input(name):
    # sklearn digits: 8x8, one channel.
    model = create_model(name, num_classes=10, in_chans=1)
    assert _forward(model, torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_train_mode_backward():
    model = create_model("resnet8", num_classes=3)
    model.train()
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["tv:resnet18", "tv:mobilenet_v3_small"])
def test_torchvision_models(name):
    model = create_model(name, num_classes=7)
    assert _forward(model, torch.randn(1, 3, 64, 64)).shape == (1, 7)
    spec = model_spec(name)
    assert spec.name == name and spec.family == "torchvision" and spec.input_size == (224, 224)


def test_torchvision_single_channel():
    model = create_model("tv:resnet18", num_classes=7, in_chans=1)
    assert model.conv1.in_channels == 1
    assert _forward(model, torch.randn(1, 1, 64, 64)).shape == (1, 7)


def test_torchvision_inception_input_size():
    assert model_spec("tv:inception_v3").input_size == (299, 299)


@pytest.mark.parametrize(
    ("name", "guess"), [("resnet19", "resnet18"), ("tv:resnet181", "resnet18")]
)
def test_unknown_name_suggests(name, guess):
    with pytest.raises(KdtoolError, match="did you mean") as info:
        create_model(name)
    assert guess in str(info.value)


@pytest.mark.parametrize("name, classes", [("resnet8", 10), ("densenet121", 10),
                                           ("tv:mobilenet_v3_small", 1000),
                                           ("tv:vit_b_16", 1000), ("tv:regnet_y_400mf", 1000)])
def test_architecture_params_counts_what_create_model_builds(name, classes):
    initialisers = dict(vars(torch.nn.init))
    if name in PARAM_COUNTS:
        expected = PARAM_COUNTS[name]
    else:  # published by torchvision for its default weights at 1000 classes
        from kdtool.models.torchvision_models import published_params

        expected = published_params(name)
    assert architecture_params(name, num_classes=classes) == expected
    # The initialisers are back, and initialise again.
    assert dict(vars(torch.nn.init)) == initialisers
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 4).weight.detach().clone()
    torch.manual_seed(0)
    assert torch.equal(a, torch.nn.Linear(4, 4).weight.detach()) and a.abs().sum() > 0


def _register(monkeypatch, name, fn, input_size=(32, 32)):
    """Register architecture ``name`` built by ``fn`` for this test only."""
    from kdtool.models import _registry

    base = model_spec("resnet8")
    monkeypatch.setitem(_registry._REGISTRY, name, base.__class__(
        name, fn, base.family, input_size))


def test_initialisers_come_back_after_a_failing_build(monkeypatch):
    initialisers = dict(vars(torch.nn.init))

    def broken(**kwargs):
        torch.nn.init.zeros_(torch.empty(2))
        raise ValueError("broken builder")

    _register(monkeypatch, "broken_net", broken)
    with pytest.raises(ValueError, match="broken builder"):
        architecture_params("broken_net")
    assert dict(vars(torch.nn.init)) == initialisers


class _NeedsAtLeast(torch.nn.Module):
    """A conv net that needs inputs of at least ``side`` pixels (like a deep stride stack)."""

    def __init__(self, side=16, broken=False, num_classes=10, in_chans=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_chans, 4, side)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, num_classes)
        self.broken = broken

    def forward(self, x):
        if self.broken:
            raise RuntimeError("an internal bug")
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_check_input_size_refuses_a_too_small_input_and_keeps_bugs_as_they_are(monkeypatch):
    from kdtool.models import check_input_size

    _register(monkeypatch, "needs16", lambda **kw: _NeedsAtLeast(**kw))
    model = create_model("needs16", num_classes=10, in_chans=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_input_size(model, "needs16", 1, (16, 16), "unused")  # big enough: silent
    with pytest.raises(KdtoolError, match=r"needs16 cannot take 1x8x8 images \(.*Kernel "
                                          r"size.*works at its own 32x32") as info:
        check_input_size(model, "needs16", 1, (8, 8), "use --image-size 32")
    assert info.value.hint == "use --image-size 32"
    # The probe changed nothing: mode, weights, BN running statistics, gradients.
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # A model that fails at its own size too is broken, not misfed: the error is torch's.
    _register(monkeypatch, "broken", lambda **kw: _NeedsAtLeast(broken=True, **kw))
    with pytest.raises(RuntimeError, match="an internal bug"):
        check_input_size(create_model("broken", in_chans=1), "broken", 1, (8, 8), "unused")


def test_train_and_distill_refuse_an_architecture_the_images_are_too_small_for(
        cli, monkeypatch, tmp_path, digits_teacher):
    _register(monkeypatch, "needs16", lambda **kw: _NeedsAtLeast(**kw))
    out = tmp_path / "m.safetensors"
    r = cli("train", "--arch", "needs16", "--data", "digits", "--epochs", "1", "--out", out)
    assert r.code == 1 and "Traceback" not in r.err
    assert "needs16 cannot take 1x8x8 images" in r.err and "--image-size 32,32" in r.err
    r = cli("distill", "--teacher", digits_teacher, "--student", "needs16", "--epochs", "1",
            "--iters-per-epoch", "1", "--out", out)
    assert r.code == 1 and "Traceback" not in r.err
    assert "needs16 cannot take 1x8x8 images" in r.err and "teacher's input size" in r.err
    assert not out.exists()
    # Fitted to a size it takes, the same architecture trains.
    r = cli("train", "--arch", "needs16", "--data", "digits", "--image-size", "16",
            "--epochs", "1", "--out", out, "--json")
    assert r.code == 0, r.err
    # A plain state_dict said to be for images it cannot take is refused at conversion.
    torch.save(create_model("needs16", in_chans=1).state_dict(), tmp_path / "plain.pth")
    args = ("convert", tmp_path / "plain.pth", "--arch", "needs16", "--in-chans", "1",
            "--mean", "0.3", "--std", "0.37", "--out", tmp_path / "c.safetensors")
    r = cli(*args, "--image-size", "8")
    assert r.code == 1 and "Traceback" not in r.err
    assert "needs16 cannot take 1x8x8 images" in r.err and "--image-size" in r.err
    assert not (tmp_path / "c.safetensors").exists()
    assert cli(*args, "--image-size", "16").code == 0


def test_the_models_table_quotes_small_counts_in_thousands(cli, monkeypatch):
    from kdtool.console import params_text

    assert [params_text(n) for n in (11_173_962, 1_634, 999)] == ["11.17M", "1.6K", "999"]
    monkeypatch.setenv("COLUMNS", "160")
    r = cli("models")
    row = next(line for line in r.out.splitlines() if " tiny_cnn " in line)
    assert "K " in row and "0.00" not in row  # tiny_cnn: 1.6K, not "0.00" million
