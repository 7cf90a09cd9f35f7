"""BatchNorm folding: exact for every architecture, never silent, and replayable from its plan."""

from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdtool.bn import bn_layers
from kdtool.calibrate.fold import (
    AFFINE,
    INTO_NEXT,
    INTO_PREV,
    ChannelAffine,
    apply_plan,
    fold_bn,
    max_abs_diff,
)
from kdtool.checkpoint import ModelMeta, load_checkpoint, read_meta, save_checkpoint
from kdtool.errors import KdtoolError
from kdtool.models import create_model, list_models

TORCHVISION = ["tv:resnet18", "tv:mobilenet_v3_small"]
# timm's EfficientNet and MobileNetV3 fuse BN and activation (BatchNormAct2d): the BN folds,
# the activation stays.
TIMM = ["timm:efficientnet_b0", "timm:mobilenetv3_small_050"]
try:
    import timm  # noqa: F401
except ImportError:
    TIMM = []
# Pre-activation nets have BNs after an addition / concatenation and before a ReLU: those
# stay scale-and-shift; every other architecture folds completely.
PREACTIVATION = {"wrn16_8", "wrn28_10", "densenet121", "densenet169"}


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters; linear layers scaled to O(1) logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in bn_layers(model):
            n = bn.num_features
            bn.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            bn.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            if bn.affine:
                bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                bn.bias.copy_(torch.rand(n, generator=g) - 0.5)
        for m in model.modules():
            if isinstance(m, nn.Linear):  # torchvision heads start near zero: no signal
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
    return model.eval()


def _activations(model: nn.Module) -> Counter:
    kinds = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.Sigmoid)
    return Counter(type(m).__name__ for m in model.modules() if isinstance(m, kinds))


def _no_bn(model: nn.Module) -> bool:
    return not any(isinstance(m, _BatchNorm) for m in model.modules())


@pytest.mark.parametrize("arch", list_models() + TORCHVISION + TIMM)
def test_fold_is_exact_for_every_architecture(arch):
    torch.manual_seed(0)
    model = randomise(create_model(arch, num_classes=10))
    size = 64 if ":" in arch else 16  # small inputs keep this fast
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    assert ref.std() > 0.05, "logits carry no signal: the comparison would prove nothing"
    first = next(model.parameters()).clone()
    folded, report = fold_bn(model)
    assert _no_bn(folded) and not folded.training
    with torch.no_grad():
        out = folded(x)
    assert (out - ref).abs().max() <= 1e-4
    assert _activations(folded) == _activations(model)
    assert [e.bn for e in report.entries] == [n for n, _ in bn_layers(model)]
    if arch in PREACTIVATION:
        assert report.kept and report.folded
        assert all(e.reason for e in report.kept)
        assert sum(isinstance(m, ChannelAffine) for m in folded.modules()) == len(report.kept)
    else:
        assert not report.kept, [e.describe() for e in report.kept]
    # The input model is untouched.
    assert len(bn_layers(model)) == len(report.entries)
    assert torch.equal(next(model.parameters()), first)
    # Replay: the plan alone turns a fresh model into one the folded state_dict fits exactly.
    with torch.device("meta"):  # no weight initialisation: the state_dict replaces it
        fresh = apply_plan(create_model(arch, num_classes=10), report.plan())
    fresh.load_state_dict(folded.state_dict(), strict=True, assign=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), out, rtol=0, atol=0)


class Wrap(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize(
    "layers, action, reason",
    [
        (lambda: [nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3)], INTO_NEXT, None),
        (lambda: [nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1)], AFFINE, "pads with zeros"),
        (
            lambda: [nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")],
            INTO_NEXT,
            None,
        ),
        (lambda: [nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3, groups=4, bias=True)], INTO_NEXT, None),
        (lambda: [nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1, padding="same")], INTO_NEXT, None),
        (lambda: [nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1)], AFFINE, "ReLU"),
        (lambda: [nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4)], INTO_PREV, None),
        (lambda: [nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 5)], INTO_NEXT, None),
        (lambda: [nn.Flatten(), nn.Linear(64, 5), nn.BatchNorm1d(5)], INTO_PREV, None),
        (lambda: [nn.ConvTranspose2d(4, 4, 2), nn.BatchNorm2d(4)], AFFINE, "ConvTranspose2d"),
    ],
)
def test_fold_rules(layers, action, reason):
    model = randomise(Wrap(*layers()))
    x = torch.randn(3, 4, 4, 4)
    folded, report = fold_bn(model)
    (entry,) = report.entries
    assert entry.action == action, entry
    if reason:
        assert reason in entry.reason
    assert _no_bn(folded)
    assert max_abs_diff(model, folded, x) <= 1e-5


class SharedUse(nn.Module):
    """A conv whose output feeds its BN and the sum; a BN applied twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.shared = nn.BatchNorm2d(3)

    def forward(self, x):
        c = self.conv(x)
        return self.shared(self.shared(self.bn(c) + c))


def test_layers_with_other_uses_stay_exact_affines():
    model = randomise(SharedUse())
    folded, report = fold_bn(model)
    kept = {e.bn: e.reason for e in report.kept}
    assert set(kept) == {"bn", "shared"}
    assert "'conv' also feeds add" in kept["bn"] and "more than once" in kept["shared"]
    assert max_abs_diff(model, folded, torch.randn(2, 3, 5, 5)) <= 1e-5


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self, reuse_conv_output: bool = False):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.tail = Wrap(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
        self.reuse = reuse_conv_output

    def forward(self, x):
        x = self.stem(x)
        c = self.conv2(x)
        x = self.bn2(c) + c if self.reuse else self.bn2(c)
        if x.mean() > 100:  # data-dependent: fx raises
            x = x * 2
        return self.tail(x).mean((2, 3))


def test_untraceable_forward_folds_by_module_patterns():
    model = randomise(Untraceable())
    x = torch.randn(4, 3, 6, 6)
    _, blind = fold_bn(model)
    by = {e.bn: e for e in blind.entries}
    # Composite children are traced on their own.
    assert (by["stem.1"].action, by["stem.1"].target, by["stem.1"].method) == (
        INTO_PREV,
        "stem.0",
        "fx",
    )
    assert (by["tail.body.1"].action, by["tail.body.1"].method) == (INTO_PREV, "fx")
    # Named order alone is a guess: without an example input bn2 stays an exact affine ...
    assert by["bn2"].action == AFFINE and "no example input" in by["bn2"].reason
    # ... and a forward pass that shows conv2 -> bn2 lets it fold.
    folded, seen = fold_bn(model, example=x)
    assert {e.bn: e.action for e in seen.entries}["bn2"] == INTO_PREV
    assert _no_bn(folded) and max_abs_diff(model, folded, x) <= 1e-5


def test_a_wrong_pattern_guess_is_undone():
    model = randomise(Untraceable(reuse_conv_output=True))
    x = torch.randn(4, 3, 6, 6)
    folded, report = fold_bn(model, example=x)
    entry = {e.bn: e for e in report.entries}["bn2"]
    assert entry.action == AFFINE and "changed the outputs" in entry.reason
    assert max_abs_diff(model, folded, x) <= 1e-5


class BatchNormAct(nn.BatchNorm2d):
    """timm-style: a BN subclass whose forward adds an activation."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_unfoldable_layers_are_refused_and_models_without_bn_pass():
    with pytest.raises(KdtoolError, match="'body.1' keeps no running statistics"):
        fold_bn(Wrap(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    with pytest.raises(KdtoolError, match="'body.1' is a BatchNormAct with a forward of its own"):
        fold_bn(Wrap(nn.Conv2d(3, 4, 3), BatchNormAct(4)))
    plain = Wrap(nn.Conv2d(3, 4, 3), nn.ReLU())
    folded, report = fold_bn(plain)
    assert report.entries == [] and folded is not plain
    assert max_abs_diff(plain, folded, torch.randn(1, 3, 5, 5)) == 0


def test_folded_checkpoint_loads_everywhere(tmp_path):
    model = randomise(create_model("wrn16_8", num_classes=10, in_chans=1))
    folded, report = fold_bn(model)
    meta = ModelMeta(
        arch="wrn16_8",
        num_classes=10,
        in_chans=1,
        input_size=[8, 8],
        mean=[0.5],
        std=[0.25],
        stages={"calibrate": {"folded": True, "fold_plan": report.plan()}},
    )
    path = save_checkpoint(tmp_path / "f.safetensors", folded, meta, force=False)
    loaded, meta2 = load_checkpoint(path)
    assert _no_bn(loaded) and not loaded.training
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), folded(x), rtol=0, atol=0)
    assert meta2.stages["calibrate"]["fold_plan"] == report.plan()
    # A plan that does not fit the architecture is a clear error, not a key mismatch.
    bad = read_meta(path)
    bad.stages["calibrate"]["fold_plan"]["layers"].pop()
    save_checkpoint(tmp_path / "bad.safetensors", folded, bad, force=False)
    with pytest.raises(KdtoolError, match="fold plan does not match the architecture"):
        load_checkpoint(tmp_path / "bad.safetensors")
    bad.stages["calibrate"]["fold_plan"] = {"version": 99}
    save_checkpoint(tmp_path / "bad.safetensors", folded, bad, force=True)
    with pytest.raises(KdtoolError, match="malformed BatchNorm fold plan"):
        load_checkpoint(tmp_path / "bad.safetensors")
