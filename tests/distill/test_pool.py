"""kdtool.distill.pool: a per-epoch pool of rendered noise, reused under symmetries."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdtool.distill.noise import make_noise
from kdtool.distill.pool import PooledNoise
from kdtool.errors import KdtoolError

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def pooled(size=64, kind="dead_leaves", channels=3, hw=(16, 16)):
    src = make_noise(kind, channels, hw, MEAN[:channels], STD[:channels], "cpu")
    return PooledNoise(src, size)


def _unnormalise(x):
    return x * torch.tensor(STD).view(1, -1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1)


def test_samples_are_symmetries_of_pool_images():
    p = pooled(size=16)
    p.start_epoch(gen(1))
    pool = p._pool
    x = _unnormalise(p.sample(64, gen(2)))
    assert x.shape == (64, 3, 16, 16)
    # Every sample is one of the 96 transforms of some pool image (up to float rounding).
    variants = []
    for img in pool:
        for t in (img, img.transpose(1, 2)):
            for f in (t, t.flip(2), t.flip(1), t.flip(1).flip(2)):
                for v in (f, 1 - f):
                    variants.extend(v[list(perm)] for perm in itertools.permutations(range(3)))
    bank = torch.stack(variants).flatten(1)
    dist = torch.cdist(x.flatten(1), bank, compute_mode="donot_use_mm_for_euclid_dist")
    dist = dist.min(1).values
    assert dist.max() < 1e-4
    # and not always the identity: most samples are no pool image as it is
    plain = torch.cdist(x.flatten(1), pool.flatten(1),
                        compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert (plain > 1e-3).float().mean() > 0.5


def test_pool_is_refilled_per_epoch_and_reproducible():
    a, b = pooled(), pooled()
    a.start_epoch(gen(5))
    b.start_epoch(gen(5))
    assert torch.equal(a._pool, b._pool)
    assert torch.equal(a.sample(8, gen(3)), b.sample(8, gen(3)))
    first = a._pool.clone()
    a.start_epoch(gen(6))
    assert not torch.equal(first, a._pool) and a.renders == 128


def test_transforms_keep_the_value_range_and_statistics():
    p = pooled(size=256)
    p.start_epoch(gen(0))
    x = _unnormalise(p.sample(512, gen(1)))
    assert x.min() >= -1e-5 and x.max() <= 1 + 1e-5
    # inversion and channel permutations keep per-channel means near 0.5 (uniform colours)
    assert (x.mean((0, 2, 3)) - 0.5).abs().max() < 0.05


def test_pool_refuses_gaussian_and_bad_sizes():
    with pytest.raises(KdtoolError, match="gaussian noise is drawn in the normalised space"):
        pooled(kind="gaussian")
    with pytest.raises(KdtoolError, match="--noise-pool must be >= 1"):
        pooled(size=0)


def test_grayscale_pool():
    src = make_noise("dead_leaves", 1, (8, 8), [0.3], [0.37], "cpu")
    p = PooledNoise(src, 32)
    assert p.sample(10, gen()).shape == (10, 1, 8, 8)
    assert p.describe()["pool_variants_per_image"] == 16
