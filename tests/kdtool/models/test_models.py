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


def test_initialisers_come_back_after_a_failing_build(monkeypatch):
    from kdtool.models import _registry

    initialisers = dict(vars(torch.nn.init))

    def broken(**kwargs):
        torch.nn.init.zeros_(torch.empty(2))
        raise ValueError("broken builder")

    spec = model_spec("resnet8")
    monkeypatch.setitem(_registry._REGISTRY, "broken_net", spec.__class__(
        "broken_net", broken, spec.family, spec.input_size))
    with pytest.raises(ValueError, match="broken builder"):
        architecture_params("broken_net")
    assert dict(vars(torch.nn.init)) == initialisers
