"""kdtool.distill.noise: on-device noise sources (gaussian, uniform, dead leaves)."""

from __future__ import annotations

import json

import pytest
import torch

from kdtool.distill.dead_leaves import render_dead_leaves
from kdtool.distill.noise import NOISE_KINDS, make_noise
from kdtool.errors import KdtoolError

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def noise(kind: str, size=(32, 32), channels: int = 3, device: str = "cpu", **options):
    mean, std = (MEAN, STD) if channels == 3 else ([0.5] * channels, [0.25] * channels)
    return make_noise(kind, channels, size, mean, std, device, **options)


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_shape_dtype_device(kind):
    x = noise(kind, size=(24, 40)).sample(5, gen())
    assert x.shape == (5, 3, 24, 40) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_deterministic_per_seed(kind):
    src = noise(kind)
    a, b, c = src.sample(6, gen(1)), src.sample(6, gen(1)), src.sample(6, gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    g = gen(1)
    assert not torch.equal(src.sample(6, g), src.sample(6, g))  # a fresh batch each call


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_describe_is_json(kind):
    d = noise(kind).describe()
    assert json.loads(json.dumps(d)) == d and d["kind"] == kind


def test_gaussian_is_standard_normal_in_normalised_space():
    x = noise("gaussian").sample(64, gen())
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01
    assert noise("gaussian").describe()["normalised_with_mean_std"] is False


def test_uniform_maps_back_to_unit_interval():
    x = noise("uniform").sample(64, gen())
    img = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert img.min() >= -1e-6 and img.max() <= 1 + 1e-6
    assert abs(img.mean().item() - 0.5) < 0.01


def test_dead_leaves_source_is_the_normalised_render():
    x = noise("dead_leaves").sample(4, gen(3))
    img, _ = render_dead_leaves(4, gen(3), channels=3, size=(32, 32), device="cpu")
    back = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert torch.allclose(back, img, atol=1e-5)


def test_dead_leaves_grayscale_and_options():
    x = noise("dead_leaves", channels=1).sample(4, gen())
    assert x.shape == (4, 1, 32, 32) and len(torch.unique(x[0])) > 1
    d = noise("dead_leaves", leaves=128).describe()
    assert d["leaves"] == 128 and "background" in d
    assert noise("dead_leaves").describe()["leaves"] == 832  # the default at 32x32


def test_errors_suggest_names():
    with pytest.raises(KdtoolError, match="unknown noise kind") as e:
        noise("gausian")
    assert "did you mean 'gaussian'" in str(e.value)
    with pytest.raises(KdtoolError) as e:
        noise("dead_leaves", shapes="cirle")
    assert "did you mean 'circle'" in str(e.value)
    with pytest.raises(KdtoolError) as e:
        noise("dead_leaves", rmn=0.1)
    assert "did you mean 'rmin'" in str(e.value)
    with pytest.raises(KdtoolError) as e:
        noise("dead_leaves", shape="circle")
    assert "did you mean 'shapes'" in str(e.value)
    with pytest.raises(KdtoolError, match="takes no options"):
        noise("gaussian", foo=0.1)


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_another_kinds_option_names_the_noise_that_takes_it(kind):
    """Named as the user set it (--shapes on the command line), with the --noise it needs."""
    with pytest.raises(KdtoolError) as e:
        noise(kind, shapes="circle")
    assert e.value.message == (f"--shapes applies to --noise dead_leaves only; this run uses "
                               f"--noise {kind}")
    assert e.value.hint == "drop --shapes, or use --noise dead_leaves"
    with pytest.raises(KdtoolError) as e:  # set through the Python API only: its key
        noise(kind, rmin=0.1)
    assert e.value.message == (f"noise option 'rmin' applies to --noise dead_leaves only; "
                               f"this run uses --noise {kind}")


def test_bad_values():
    with pytest.raises(KdtoolError, match="mean/std"):
        make_noise("uniform", 3, (32, 32), [0.5], [0.5], "cpu")
    with pytest.raises(KdtoolError, match="rmin"):
        noise("dead_leaves", rmin=0.5, rmax=0.1)
    with pytest.raises(KdtoolError, match="leaves"):
        noise("dead_leaves", leaves=0)
    with pytest.raises(KdtoolError, match="std"):
        make_noise("uniform", 1, (32, 32), [0.5], [0.0], "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_cuda_on_device_and_deterministic(kind):
    src = noise(kind, device="cuda")
    a, b = src.sample(32, gen(5, "cuda")), src.sample(32, gen(5, "cuda"))
    assert a.is_cuda and a.shape == (32, 3, 32, 32) and torch.equal(a, b)
    with pytest.raises(KdtoolError, match="generator"):
        src.sample(2, gen(0))
    if kind == "dead_leaves":
        img, index = render_dead_leaves(32, gen(5, "cuda"), channels=3, size=(32, 32),
                                        device="cuda")
        assert img.min() >= 0 and img.max() <= 1 and (index >= 0).float().mean() > 0.999
