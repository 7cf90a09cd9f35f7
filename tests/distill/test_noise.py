"""kdtool.distill.noise: on-device noise sources (gaussian, uniform, dead leaves)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdtool.distill.noise import (
    NOISE_KINDS,
    SHAPES,
    _near,
    make_noise,
    render_dead_leaves,
    sample_radii,
    shape_constraints,
    shape_masks,
)
from kdtool.errors import KdtoolError

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def noise(kind: str, size=(32, 32), channels: int = 3, device: str = "cpu", **options):
    mean, std = (MEAN, STD) if channels == 3 else ([0.5] * channels, [0.25] * channels)
    return make_noise(kind, channels, size, mean, std, device, **options)


def render(n: int = 8, seed: int = 0, channels: int = 3, size=(32, 32), **options):
    return render_dead_leaves(n, gen(seed), channels=channels, size=size, device="cpu", **options)


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


def test_dead_leaves_covers_canvas_with_drawn_colours():
    img, index, stats = render(16)
    assert img.shape == (16, 3, 32, 32) and index.shape == (16, 32, 32)
    assert (index >= 0).all() and stats["background_pixels"] == 0
    assert img.min() >= 0 and img.max() <= 1
    # Every pixel has its shape's colour: equal index -> equal colour, in each image.
    key = (torch.arange(16).view(16, 1, 1) * 10**7 + index).reshape(-1)
    colours = img.permute(0, 2, 3, 1).reshape(-1, 3)
    order = torch.argsort(key)
    key, colours = key[order], colours[order]
    same = key[1:] == key[:-1]
    assert torch.equal(colours[1:][same], colours[:-1][same])


def test_dead_leaves_source_is_the_normalised_render():
    x = noise("dead_leaves").sample(4, gen(3))
    img, _, _ = render(4, seed=3)
    back = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert torch.allclose(back, img, atol=1e-5)


def test_dead_leaves_colour_count():
    img, _, _ = render(4)
    big = [len(torch.unique(im.reshape(3, -1), dim=1).T) for im in img]
    assert min(big) > 1
    img, _, _ = render(4, rmin=0.03, rmax=0.03)  # tiny shapes only: one to a few pixels each
    small = [len(torch.unique(im.reshape(3, -1), dim=1).T) for im in img]
    assert min(small) > 300


def test_dead_leaves_grayscale():
    x = noise("dead_leaves", channels=1).sample(4, gen())
    assert x.shape == (4, 1, 32, 32)
    img, index, _ = render(4, channels=1)
    assert img.shape == (4, 1, 32, 32) and (index >= 0).all()
    assert img.min() >= 0 and img.max() <= 1 and len(torch.unique(img[0])) > 1


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_type_renders_alone(shape):
    img, index, stats = render(4, shapes=shape)
    assert (index >= 0).all() and stats["background_pixels"] == 0
    assert len(torch.unique(img[0].reshape(3, -1), dim=1).T) > 5


def test_render_draws_exact_squares():
    # Front shape = a square of half-side 0.25 (8 px at 32): a 16 x 16 block unless clipped.
    _, index, _ = render(32, shapes="square", rmin=0.25, rmax=0.25)
    full = 0
    for front in index == 0:
        rows, cols = front.any(1).nonzero().squeeze(1), front.any(0).nonzero().squeeze(1)
        box = front[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.all() and len(rows) <= 16 and len(cols) <= 16
        if rows[0] > 0 and rows[-1] < 31 and cols[0] > 0 and cols[-1] < 31:
            assert len(rows) == len(cols) == 16
            full += 1
    assert full > 0


def test_render_draws_round_circles():
    _, index, _ = render(32, shapes="circle", rmin=0.25, rmax=0.25)
    areas = []
    for front in index == 0:
        rows, cols = front.any(1).nonzero().squeeze(1), front.any(0).nonzero().squeeze(1)
        if rows[0] > 0 and rows[-1] < 31 and cols[0] > 0 and cols[-1] < 31:
            areas.append(front.sum().item())
    assert areas and all(abs(a / (math.pi * 8**2) - 1) < 0.08 for a in areas)


def one_shape(kind: str, r: float = 0.3, u=(0.0, 0.0, 0.0, 0.0)):
    t = torch.tensor
    rows = shape_constraints(t([SHAPES.index(kind)]), t([0.5]), t([0.5]), t([r]), t([u]))
    return shape_masks(rows, (256, 256))[0].float().mean().item()  # area, canvas = 1


@pytest.mark.parametrize(("kind", "u", "area"), [
    ("circle", (0, 0, 0, 0), math.pi * 0.09),
    ("square", (0, 0, 0, 0), 4 * 0.09),
    ("rotated_square", (0.37, 0, 0, 0), 4 * 0.09),
    ("rectangle", (0.0, 0.2, 0, 0), 4 * 0.25 * 0.09),  # aspect 0.25
    ("rectangle", (1.0, 0.7, 0, 0), 4 * 0.09),  # aspect 1
    ("triangle", (0, 1 / 3, 2 / 3, 0), 3 * math.sqrt(3) / 4 * 0.09),  # equilateral
    ("quadrilateral", (0.6, 0.1, 0.35, 0.85), 2 * 0.09),  # inscribed square
])
def test_single_shape_area(kind, u, area):
    assert one_shape(kind, 0.3, u) == pytest.approx(area, rel=0.02)


def test_circumcircle_pretest_same_on_matmul_and_elementwise():
    f = torch.rand(3, 50, 4)
    f[..., 2] = f[..., 0] ** 2 + f[..., 1] ** 2
    f[..., 3] = 1
    coef = torch.randn(3, 4, 20)
    assert torch.equal(_near(f, coef, matmul=True), _near(f, coef, matmul=False))


def analytic_cdf(r, rmin=0.03, rmax=1.0):
    return (rmin**-2 - r**-2) / (rmin**-2 - rmax**-2)


def test_radii_follow_inverse_cube_law():
    r = sample_radii(200_000, gen(), 0.03, 1.0, 3.0).double().sort().values
    assert r.min() >= 0.03 and r.max() <= 1.0
    empirical = torch.arange(1, r.numel() + 1, dtype=torch.float64) / r.numel()
    assert (empirical - analytic_cdf(r)).abs().max() < 0.01
    median = (0.5 * (0.03**-2 + 1.0)) ** -0.5  # F(median) = 1/2
    assert r.median().item() == pytest.approx(median, rel=0.01)


def test_radii_other_exponents():
    r = sample_radii(100_000, gen(), 0.1, 0.5, 1.0)  # p ~ 1/r: log-uniform
    assert torch.log(r).mean().item() == pytest.approx(math.log(0.1 * 0.5) / 2, abs=0.01)
    r = sample_radii(100_000, gen(), 0.1, 0.5, 0.0)  # uniform
    assert r.mean().item() == pytest.approx(0.3, abs=0.005)


def test_fallback_background_after_round_cap():
    img, index, stats = render(8, max_rounds=1)
    left = index < 0
    assert stats["background_pixels"] == int(left.sum()) > 0
    for im, lf in zip(img, left, strict=True):
        if lf.any():  # one background colour per image under the uncovered pixels
            assert len(torch.unique(im[:, lf], dim=1).T) == 1
    assert img.min() >= 0 and img.max() <= 1
    d = noise("dead_leaves", max_rounds=3).describe()
    assert d["max_rounds"] == 3 and "background" in d


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
        noise("gaussian", rmin=0.1)


def test_bad_values():
    with pytest.raises(KdtoolError, match="mean/std"):
        make_noise("uniform", 3, (32, 32), [0.5], [0.5], "cpu")
    with pytest.raises(KdtoolError, match="rmin"):
        noise("dead_leaves", rmin=0.5, rmax=0.1)
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
        img, index, _ = render_dead_leaves(32, gen(5, "cuda"), channels=3, size=(32, 32),
                                           device="cuda")
        assert (index >= 0).all() and img.min() >= 0 and img.max() <= 1
