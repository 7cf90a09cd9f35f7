"""kdtool.distill.dead_leaves: the shapes, their statistics and the windowed renderer."""

from __future__ import annotations

import math

import pytest
import torch

from kdtool.distill import dead_leaves as dl
from kdtool.distill.dead_leaves import (
    MEAN_AREA,
    SHAPES,
    default_leaves,
    mean_r2,
    render_dead_leaves,
    shape_constraints,
    shape_masks,
    stratified_radii,
)
from kdtool.errors import KdtoolError


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def render(n: int = 8, seed: int = 0, channels: int = 3, size=(32, 32), **options):
    return render_dead_leaves(n, gen(seed), channels=channels, size=size, device="cpu",
                              **options)


def brute_force(n, seed, size, leaves, rmin=0.03, rmax=1.0, alpha=3.0, shapes="mixed",
                device="cpu", window_growth=dl.WINDOW_GROWTH):
    """The same random draws as the renderer, every shape tested on the whole canvas."""
    g = gen(seed, device)
    plan = dl._plan(leaves, size, rmin, rmax, alpha, shapes, torch.device(device),
                    window_growth)
    kind = torch.empty(leaves, dtype=torch.long, device=device)
    for i, k in enumerate(plan.kinds):
        kind[plan.bounds[i]:plan.bounds[i + 1]] = k
    h, w = size
    u = torch.rand(n, leaves, 7, generator=g, device=device)
    r = stratified_radii(plan.stratum, u[..., 2], leaves, rmin, rmax, alpha)
    scale = max(h, w)
    rows = shape_constraints(kind.expand(n, -1), u[..., 0] * w / scale, u[..., 1] * h / scale,
                             r, u[..., 3:])[:, plan.by_side]
    depth = torch.rand(n, leaves, generator=g, device=device).argsort(1).argsort(1)
    front = torch.where(shape_masks(rows, size), depth[..., None, None], leaves).amin(1)
    return torch.where(front == leaves, -1, front)


@pytest.mark.parametrize(("size", "options"), [
    ((32, 32), {}),
    ((20, 32), {"leaves": 256}),  # a wide canvas: windows clipped in y
    ((32, 24), {"leaves": 256, "shapes": "rotated_square"}),
    ((16, 16), {"leaves": 128, "rmin": 0.2, "rmax": 0.6, "alpha": 1.0}),
    ((32, 32), {"leaves": 256, "budget": 5000}),  # the batch split into many chunks
    ((32, 32), {"window_growth": 2.0}),  # fewer, larger windows
    ((24, 24), {"leaves": 256, "window_growth": 1.05}),  # a window side for every size
])
def test_windows_render_exactly_what_the_full_canvas_test_gives(size, options):
    _, index = render(6, seed=3, size=size, **options)
    leaves = options.get("leaves", default_leaves(size, 0.03, 1.0, 3.0, "mixed"))
    extra = {k: v for k, v in options.items()
             if k in ("rmin", "rmax", "alpha", "shapes", "window_growth")}
    assert torch.equal(index, brute_force(6, 3, size, leaves, **extra))


def test_window_growth_must_grow():
    with pytest.raises(KdtoolError, match="window growth must be > 1, got 1"):
        render(1, window_growth=1.0)


def test_pixels_show_their_shape_colour_and_the_canvas_is_covered():
    img, index = render(16)
    assert img.shape == (16, 3, 32, 32) and index.shape == (16, 32, 32)
    assert img.min() >= 0 and img.max() <= 1
    assert (index < 0).float().mean() < 1e-3 and index.max() < 832
    # Equal index -> equal colour, in each image (the background included).
    key = (torch.arange(16).view(16, 1, 1) * 10**7 + index).reshape(-1)
    colours = img.permute(0, 2, 3, 1).reshape(-1, 3)
    order = torch.argsort(key)
    key, colours = key[order], colours[order]
    same = key[1:] == key[:-1]
    assert torch.equal(colours[1:][same], colours[:-1][same])
    assert len(torch.unique(index[0])) > 50  # many shapes show, not a few big ones


def test_default_leaves_leave_almost_nothing_uncovered():
    for size in ((32, 32), (8, 8)):
        _, index = render(256, seed=1, size=size)
        uncovered = (index < 0).sum().item() / 256  # pixels per image
        assert uncovered < 0.2, size  # measured: 0.09 at 32x32 (edge pixels), 0.003 at 8x8
    assert default_leaves((32, 32), 0.03, 1.0, 3.0, "mixed") == 832
    # Radii are fractions of the size: more pixels need only log(pixels) more shapes,
    # smaller shapes need proportionally more.
    assert default_leaves((8, 8), 0.03, 1.0, 3.0, "mixed") == 704
    assert default_leaves((32, 32), 0.03, 0.03, 3.0, "mixed") > 6 * 832


def test_background_shows_behind_all_shapes():
    img, index = render(8, leaves=64)  # too few shapes to cover the canvas
    left = index < 0
    assert left.any()
    for im, lf in zip(img, left, strict=True):
        if lf.any():  # one background colour per image under the uncovered pixels
            assert len(torch.unique(im[:, lf], dim=1).T) == 1


def test_colour_count_and_grayscale():
    img, _ = render(4, rmin=0.03, rmax=0.03)  # tiny shapes only: one to a few pixels each
    assert min(len(torch.unique(im.reshape(3, -1), dim=1).T) for im in img) > 300
    img, _ = render(4, channels=1)
    assert img.shape == (4, 1, 32, 32) and len(torch.unique(img[0])) > 1


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_type_renders_alone(shape):
    img, index = render(4, shapes=shape)
    assert (index < 0).float().mean() < 1e-3
    assert len(torch.unique(img[0].reshape(3, -1), dim=1).T) > 5


def test_render_draws_exact_squares():
    # Front shape = a square of half-side 0.25 (8 px at 32): a 16 x 16 block unless clipped.
    _, index = render(32, shapes="square", rmin=0.25, rmax=0.25)
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
    _, index = render(32, shapes="circle", rmin=0.25, rmax=0.25)
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


@pytest.mark.parametrize("kind", SHAPES)
def test_mean_areas_and_extents(kind):
    """MEAN_AREA (which sizes the default leaves) and EXTENT (which sizes the windows)."""
    n, r, box = 2000, 0.2, 0.3  # shapes of radius r at (0.5, 0.5); points in 0.5 +- box
    k = torch.full((n,), SHAPES.index(kind))
    rows = shape_constraints(k, torch.full((n,), 0.5), torch.full((n,), 0.5),
                             torch.full((n,), r), torch.rand(n, 4, generator=gen(2)))
    p = 0.5 + box * (2 * torch.rand(n, 2000, 2, generator=gen(3)) - 1)
    x, y = p[..., 0, None], p[..., 1, None]
    a = rows[:, None]  # (n, 1, 4 rows, 4)
    inside = (a[..., 0] * x + a[..., 1] * y + a[..., 2] * (x * x + y * y) + a[..., 3] >= 0
              ).all(-1)
    area = inside.float().mean(1).sum().item() * (2 * box) ** 2
    reach = (p[inside] - 0.5).abs().max().item()
    assert area / n == pytest.approx(MEAN_AREA[kind] * r * r, rel=0.04)
    assert reach <= dl.EXTENT[kind] * r + 1e-6


def test_radii_follow_the_power_law_and_fill_every_stratum():
    leaves, rmin, rmax = 1024, 0.03, 1.0
    plan = dl._plan(leaves, (32, 32), rmin, rmax, 3.0, "mixed", torch.device("cpu"))
    r = stratified_radii(plan.stratum, torch.rand(200, leaves, generator=gen()), leaves, rmin,
                         rmax, 3.0).double()
    assert r.min() >= rmin and r.max() <= rmax
    flat = r.reshape(-1).sort().values
    empirical = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / flat.numel()
    analytic = (rmin**-2 - flat**-2) / (rmin**-2 - rmax**-2)
    assert (empirical - analytic).abs().max() < 0.01
    # One image: its k-th smallest radius lies in the k-th stratum.
    one = r[0].sort().values
    cdf = (rmin**-2 - one**-2) / (rmin**-2 - rmax**-2)
    k = torch.arange(leaves, dtype=torch.float64)
    assert ((cdf >= k / leaves - 1e-9) & (cdf <= (k + 1) / leaves + 1e-9)).all()
    assert mean_r2(rmin, rmax, 3.0) == pytest.approx((r**2).mean().item(), rel=0.01)


def test_other_exponents():
    for alpha, check in ((1.0, lambda r: torch.log(r).mean().item() - math.log(0.05) / 2),
                         (0.0, lambda r: r.mean().item() - 0.3)):
        u = torch.rand(100_000, generator=gen())
        r = stratified_radii(torch.zeros(100_000), u, 1, 0.1, 0.5, alpha)
        assert abs(check(r)) < 0.005
        assert mean_r2(0.1, 0.5, alpha) == pytest.approx((r**2).mean().item(), rel=0.01)


def test_rendering_never_reads_back_from_the_device(monkeypatch):
    """No host synchronisation once the plan is cached: nothing is read back."""
    render(4)  # plans are built (on the host) once per configuration

    def refuse(*_a, **_k):
        raise AssertionError("host read-back while rendering")

    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    render(4, seed=1)


@pytest.mark.gpu
def test_cuda_renders_the_same_as_the_full_canvas_test_without_syncing():
    leaves = default_leaves((32, 32), 0.03, 1.0, 3.0, "mixed")
    render_dead_leaves(4, gen(0, "cuda"), channels=3, size=(32, 32), device="cuda")  # plan
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        img, index = render_dead_leaves(16, gen(3, "cuda"), channels=3, size=(32, 32),
                                        device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert img.is_cuda and torch.equal(index, brute_force(16, 3, (32, 32), leaves,
                                                          device="cuda"))
