"""BatchNorm statistics recomputed from real batches: an exact cumulative average, no labels."""

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

from kdtool.bn import batch_stats, bn_layers
from kdtool.calibrate.recompute import recompute_bn_stats, sample_indices
from kdtool.data import load_data
from kdtool.errors import KdtoolError
from kdtool.loader import DeviceLoader
from kdtool.models import create_model

MEAN, STD = [0.3], [0.37]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def _noise_stats_model(seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet8", num_classes=10, in_chans=1)
    for _, bn in bn_layers(model):  # stand-in for noise statistics
        bn.running_mean.uniform_(-3, 3)
        bn.running_var.uniform_(5, 10)
        bn.num_batches_tracked.fill_(999)
    model.layer1[0].bn1.momentum = 0.3  # a non-default momentum must survive
    return model.eval()


def _batches(data, batches, batch_size, seed):
    index = sample_indices(len(data), batches, batch_size, seed)
    loader = DeviceLoader(data.subset(index), batch_size, "cpu", MEAN, STD)
    return [x for x, _ in loader]


def test_statistics_are_the_cumulative_average_of_the_batches(digits):
    model = _noise_stats_model()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    batches = _batches(digits, 5, 12, seed=3)
    # Reference: each BN's input batch mean and unbiased variance, averaged over the batches,
    # with every BN normalising by its batch as it does during the pass.
    seen: dict[str, list] = {}
    hooks = [
        bn.register_forward_pre_hook(
            lambda m, a, name=name: seen.setdefault(name, []).append(a[0].detach().clone())
        )
        for name, bn in bn_layers(model)
    ]
    with torch.no_grad(), batch_stats(model):
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()

    info = recompute_bn_stats(
        model, digits, MEAN, STD, batches=5, batch_size=12, seed=3, progress=False
    )
    assert (info.images, info.batches, info.batch_size, info.layers) == (60, 5, 12, 9)
    for name, bn in bn_layers(model):
        xs = seen[name]
        assert len(xs) == 5
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in xs])
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var.mean(0), rtol=1e-5, atol=1e-5)
        assert int(bn.num_batches_tracked) == 5
    # torch's own update_bn on the same batches agrees.
    twin = _noise_stats_model()
    update_bn(batches, twin)
    for (_, a), (_, b) in zip(bn_layers(model), bn_layers(twin), strict=True):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
    # Only the statistics changed; modes and momenta are back.
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    assert not any(m.training for m in model.modules())
    assert model.layer1[0].bn1.momentum == 0.3 and model.layer1[0].bn2.momentum == 0.1


def test_labels_are_never_read_and_the_seed_decides(digits, tmp_path):
    x = digits.x[:, 0].numpy()
    np.savez(tmp_path / "unlabeled.npz", x=x, y=np.full(len(x), -1))
    unlabeled = load_data(tmp_path / "unlabeled.npz")
    assert not unlabeled.labeled

    def stats(data, seed):
        model = _noise_stats_model()
        recompute_bn_stats(model, data, MEAN, STD, 4, 16, seed, progress=False)
        return torch.cat([bn.running_mean for _, bn in bn_layers(model)])

    a = stats(digits, 1)
    torch.testing.assert_close(stats(unlabeled, 1), a, rtol=0, atol=0)
    assert not torch.allclose(stats(digits, 2), a)
    # Fewer batches with the same seed take a prefix of the same images.
    assert torch.equal(sample_indices(1000, 2, 16, 5), sample_indices(1000, 8, 16, 5)[:32])


def test_too_few_images_says_how_many_there_are(digits):
    small = digits.subset(slice(0, 100))
    with pytest.raises(
        KdtoolError,
        match=r"has 100 images but --batches 32 x --batch-size 16 "
        r"needs 512.*lower --batches to 6",
    ):
        recompute_bn_stats(_noise_stats_model(), small, MEAN, STD, 32, 16, progress=False)
    # Fewer images than one batch: the fix is a smaller batch, not fewer batches.
    with pytest.raises(KdtoolError, match=r"has 7 images but --batches 1 x --batch-size 16 "
                                          r"needs 16 \(lower --batch-size to 7 \(or less\)"):
        recompute_bn_stats(_noise_stats_model(), digits.subset(slice(0, 7)), MEAN, STD, 1, 16,
                           progress=False)
    with pytest.raises(KdtoolError, match="--batch-size must be >= 2"):
        recompute_bn_stats(_noise_stats_model(), digits, MEAN, STD, 4, 1, progress=False)
    with pytest.raises(KdtoolError, match="no BatchNorm layers: nothing to calibrate"):
        recompute_bn_stats(torch.nn.Conv2d(1, 2, 3), digits, MEAN, STD, progress=False)
