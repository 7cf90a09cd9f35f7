"""Classes and input channels read off a plain state_dict's shapes (kdtool.state_dims)."""

import pytest
import torch

from kdtool.checkpoint import ForeignSpec, load_checkpoint
from kdtool.models import create_model
from kdtool.state_dims import read_dims


@pytest.mark.parametrize(("arch", "classes", "chans", "head", "stem"), [
    ("tiny_cnn", 4, 1, "linear.weight", "conv1.weight"),
    ("resnet8", 2, 2, "linear.weight", "conv1.weight"),
    # a real value equal to a probe value reads as any other
    ("tv:mobilenet_v3_small", 7, 3, "classifier.3.weight", "features.0.0.weight"),
])
def test_classes_and_channels_come_from_the_shapes(arch, classes, chans, head, stem):
    state = create_model(arch, num_classes=classes, in_chans=chans).state_dict()
    assert read_dims(arch, state, {}) == {"num_classes": (classes, head),
                                          "in_chans": (chans, stem)}
    # what the user said is not read again
    assert read_dims(arch, state, {"num_classes": classes, "in_chans": None}) == {
        "in_chans": (chans, stem)}
    assert read_dims(arch, state, {"num_classes": 1, "in_chans": 1}) == {}


def test_shapes_that_disagree_or_are_missing_say_nothing():
    state = create_model("tiny_cnn", num_classes=4, in_chans=1).state_dict()
    state["linear.bias"] = torch.zeros(6)  # the classifier's rows say 4, its bias 6
    assert "num_classes" not in read_dims("tiny_cnn", state, {})
    del state["conv1.weight"]
    assert read_dims("tiny_cnn", state, {}) == {}


def test_a_plain_state_dict_loads_without_its_counts(tmp_path):
    model = create_model("resnet8", num_classes=3, in_chans=1)
    torch.save(model.state_dict(), tmp_path / "r8.pt")
    loaded, meta = load_checkpoint(tmp_path / "r8.pt", ForeignSpec("resnet8", mean=[0.5],
                                                                    std=[0.25]))
    assert (meta.num_classes, meta.in_chans, meta.mean) == (3, 1, [0.5])
    assert meta.provenance["shapes_read"] == {"num_classes": "linear.weight",
                                              "in_chans": "conv1.weight"}
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded(x), model.eval()(x))


def test_an_architecture_that_cannot_be_built_on_the_meta_device_keeps_the_defaults():
    state = create_model("tv:regnet_x_400mf", num_classes=5).state_dict()
    assert read_dims("tv:regnet_x_400mf", state, {}) == {}  # the load then names fc.weight
