"""Noise inputs for data-free distillation, generated on the training device.

Every batch is fresh, vectorised (no per-image Python loops, no host-device data
copies) and drawn only from the ``torch.Generator`` passed in: the same generator
state and calls give the same images on a device. Samples are in the teacher's
*normalised* input space. Dead leaves are rendered front to back in rounds; each
round tests every image's uncovered pixels against K new shapes of that image.
"""

from __future__ import annotations

import math

import torch

from kdtool.errors import KdtoolError, check_choice

NOISE_KINDS = ("gaussian", "uniform", "dead_leaves")
SHAPES = ("circle", "square", "rotated_square", "rectangle", "triangle", "quadrilateral")
SHAPE_CHOICES = (*SHAPES, "mixed")
_OPTIONS = {"gaussian": (), "uniform": (),
            "dead_leaves": ("rmin", "rmax", "alpha", "shapes", "chunk", "budget", "max_rounds")}


def sample_radii(n: int, gen: torch.Generator, rmin: float = 0.03, rmax: float = 1.0,
                 alpha: float = 3.0, device=None) -> torch.Tensor:
    """``n`` radii with density p(r) ~ r^-alpha on [rmin, rmax], by inverse CDF."""
    _check_radii(rmin, rmax, alpha)
    u = torch.rand(n, generator=gen, device=device if device is not None else gen.device)
    return _radii_from_uniform(u, rmin, rmax, alpha)


def _check_radii(rmin: float, rmax: float, alpha: float) -> None:
    if not (0 < rmin <= rmax):
        raise KdtoolError(f"dead leaves radii need 0 < rmin <= rmax, got rmin={rmin}, rmax={rmax}",
                          "radii are fractions of the image size, e.g. rmin=0.03 rmax=1")
    if not math.isfinite(alpha):
        raise KdtoolError(f"dead leaves alpha must be a finite number, got {alpha}")


def _radii_from_uniform(u: torch.Tensor, rmin: float, rmax: float, alpha: float) -> torch.Tensor:
    if abs(alpha - 1.0) < 1e-12:  # p ~ 1/r: log-uniform
        return rmin * (rmax / rmin) ** u
    e = 1.0 - alpha
    lo, hi = rmin**e, rmax**e
    return (lo + u * (hi - lo)).pow(1.0 / e).clamp_(rmin, rmax)  # clamp: float rounding only


def shape_constraints(kind: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor,
                      u: torch.Tensor) -> torch.Tensor:
    """Half-space rows (..., 4, 4): (x, y) is inside iff a0 x + a1 y + a2 (x^2+y^2) + a3 >= 0
    for every row a. ``kind`` indexes SHAPES; ``u`` (..., 4) uniforms set orientation,
    aspect ratio and vertex angles. Polygons: 4 counter-clockwise vertices on a circle,
    inside = left of every edge (convex); a triangle repeats a vertex (row 0 >= 0)."""
    pi = math.pi
    corner = pi / 4 + torch.arange(4, device=r.device, dtype=r.dtype) * (pi / 2)
    s = _aspect(u)
    phi = torch.where(u[..., 1] < 0.5, torch.atan(s), torch.atan(1 / s))[..., None]
    rect = torch.cat([phi, pi - phi, pi + phi, 2 * pi - phi], dim=-1)
    tri = torch.sort(u[..., :3], dim=-1).values
    tri = torch.cat([tri, tri[..., 2:]], dim=-1) * (2 * pi)
    quad = torch.sort(u, dim=-1).values * (2 * pi)
    k = kind[..., None]
    ang = torch.where(k == 2, corner + u[..., :1] * (pi / 2), corner)  # 1, 2: (rotated) square
    ang = torch.where(k == 3, rect, torch.where(k == 4, tri, torch.where(k == 5, quad, ang)))
    rad = circumradius(kind, r, u)
    vx = cx[..., None] + rad[..., None] * torch.cos(ang)
    vy = cy[..., None] + rad[..., None] * torch.sin(ang)
    ex, ey = vx.roll(-1, dims=-1) - vx, vy.roll(-1, dims=-1) - vy
    poly = torch.stack([-ey, ex, torch.zeros_like(ex), ey * vx - ex * vy], dim=-1)
    circle = torch.zeros_like(poly)
    circle[..., 3] = 1.0  # rows 1..3: 1 >= 0, always true
    circle[..., 0, :] = torch.stack([2 * cx, 2 * cy, -torch.ones_like(cx),
                                     r * r - cx * cx - cy * cy], dim=-1)
    return torch.where((kind == 0)[..., None, None], circle, poly)


def _aspect(u: torch.Tensor) -> torch.Tensor:
    # rectangle: half-sides r and r*s, s in [0.25, 1]; u[1] puts the long side x or y
    return 0.25 + 0.75 * u[..., 0]


def circumradius(kind: torch.Tensor, r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Radius of the circle through a shape's vertices (r for circles)."""
    rad = torch.where((kind == 1) | (kind == 2), r * math.sqrt(2), r)
    return torch.where(kind == 3, r * torch.sqrt(1 + _aspect(u) ** 2), rad)


def pixel_features(size: tuple[int, int], device) -> torch.Tensor:
    """(H*W, 4) features (x, y, x^2 + y^2, 1) of pixel centres, raster order.

    Pixel (i, j) has centre ((j + 0.5) / S, (i + 0.5) / S), S = max(H, W): radii
    are fractions of the longer side.
    """
    h, w = size
    y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / max(h, w)
    x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / max(h, w)
    yy, xx = (t.reshape(-1) for t in torch.meshgrid(y, x, indexing="ij"))
    return torch.stack([xx, yy, xx * xx + yy * yy, torch.ones_like(xx)], dim=-1)


def _inside(rows: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """rows (..., 4, 4), feats (..., 3 or 4) -> (...) bool, element-wise.

    Not a matmul: a TF32 matmul on CUDA would round the circle rows, whose terms
    nearly cancel, and wreck small shapes.
    """
    v = (rows[..., :3] * feats[..., None, :3]).sum(-1) + rows[..., 3]
    return (v >= 0).all(-1)


def shape_masks(rows: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., 4, 4) constraint rows -> (..., H, W) bool masks on the full canvas."""
    feats = pixel_features(size, rows.device)
    return _inside(rows[..., None, :, :], feats).view(*rows.shape[:-2], *size)


def _near(f: torch.Tensor, coef: torch.Tensor, matmul: bool | None = None) -> torch.Tensor:
    """f (B, P, 4) pixel features, coef (B, 4, K) -> (B, P, K) bool: f @ coef >= 0."""
    if f.device.type == "cpu" if matmul is None else matmul:
        return torch.bmm(f, coef) >= 0  # exact fp32 on CPU, and the fastest there
    # Element-wise on accelerators, where a matmul may run in TF32 (see _inside).
    v = torch.addcmul(coef[:, None, 3], coef[:, None, 0], f[..., :1])
    return v.addcmul_(coef[:, None, 1], f[..., 1:2]).addcmul_(coef[:, None, 2], f[..., 2:3]) >= 0


def render_dead_leaves(n: int, gen: torch.Generator, *, channels: int, size: tuple[int, int],
                       device, rmin: float = 0.03, rmax: float = 1.0, alpha: float = 3.0,
                       shapes: str = "mixed", chunk: int = 16, budget: int | None = None,
                       max_rounds: int = 64):
    """Image-space dead leaves batch: (images (n, C, H, W) in [0, 1], index, stats).

    ``index`` (n, H, W) int64 is the drawing order of the shape seen at each pixel
    (0 = frontmost), -1 where no shape covered the pixel within ``max_rounds``;
    such pixels show one extra full-canvas shape behind all others (a background
    colour per image), so the image is complete even then. ``stats``: rounds,
    shapes drawn, background pixels.
    """
    check_choice(shapes, SHAPE_CHOICES, "dead leaves shapes")
    device = torch.device(device)
    budget = budget or default_budget(device)
    h, w = size
    hw, scale = h * w, max(h, w)
    shape_id = None if shapes == "mixed" else SHAPES.index(shapes)
    feats = pixel_features(size, device)
    # The background colour is also the initial canvas: pixels never covered keep it.
    canvas = torch.rand(n, 1, channels, generator=gen, device=device)
    canvas = canvas.repeat(1, hw, 1).view(-1, channels)
    index = torch.full((n * hw,), -1, dtype=torch.long, device=device)
    uncovered = torch.ones(n, hw, dtype=torch.bool, device=device)
    drawn = torch.zeros(n, dtype=torch.long, device=device)
    pad = torch.tensor([0.0, 0.0, 1e4, 1.0], device=device)  # huge x^2+y^2: never inside
    rounds = total = 0
    while rounds < max_rounds:
        todo = uncovered.view(-1).nonzero().squeeze(1)  # host syncs: a few per round
        if todo.numel() == 0:
            break
        counts = uncovered.sum(1)
        act = counts.nonzero().squeeze(1)  # images with pixels left
        na, width = act.numel(), int(counts.max())
        # +16: drawing a shape costs about as much as testing 16 pixels against it; the
        # growth cap keeps small batches from testing every pixel against 1000s of shapes.
        k = max(chunk, min(budget // (na * (width + 16)), chunk * 8 ** (rounds + 1), 4096))
        # f (na, width, 4): features of each active image's uncovered pixels, padded.
        img = todo // hw
        row = ((counts > 0).cumsum(0) - 1)[img]
        col = torch.arange(todo.numel(), device=device) - (counts.cumsum(0) - counts)[img]
        f = pad.repeat(na, width, 1)
        f[row, col] = feats[todo % hw]
        gid = torch.zeros(na, width, dtype=torch.long, device=device)
        gid[row, col] = todo
        u = torch.rand(na, k, 8 + channels, generator=gen, device=device)
        cx, cy = u[..., 0] * (w / scale), u[..., 1] * (h / scale)
        r = _radii_from_uniform(u[..., 2], rmin, rmax, alpha)
        kind = (torch.full_like(r, shape_id, dtype=torch.long) if shape_id is not None
                else (u[..., 3] * len(SHAPES)).long().clamp_(max=len(SHAPES) - 1))
        u4 = u[..., 4:8]
        rad = circumradius(kind, r, u4)
        # Cheap pre-test of every (pixel, shape) pair: is the pixel inside the shape's
        # circumcircle? One product with the pixel features (x, y, x^2 + y^2, 1).
        ones = torch.ones_like(cx)
        coef = torch.stack([2 * cx, 2 * cy, -ones, rad * rad - cx * cx - cy * cy], 1)
        pair = _near(f, coef).view(-1).view(torch.uint8).nonzero().squeeze(1)
        key = pair // k  # padded pixel id (row * width + col); pairs sorted by it, then shape
        si = key // width * k + (pair - key * k)  # shape id (row * k + shape index)
        # Exact rows only for shapes that passed for some pixel: late rounds draw
        # thousands of shapes per image for a handful of pixels.
        used = torch.zeros(na * k, dtype=torch.bool, device=device)
        used[si] = True
        sel = used.nonzero().squeeze(1)
        rows = shape_constraints(kind.view(-1)[sel], cx.view(-1)[sel], cy.view(-1)[sel],
                                 r.view(-1)[sel], u4.reshape(-1, 4)[sel])
        hit = _inside(rows[used.cumsum(0)[si] - 1], f.view(-1, 4)[key]).nonzero().squeeze(1)
        key, si = key[hit], si[hit]
        # A pixel shows its first hit (lowest shape index): the frontmost shape.
        first = torch.ones_like(key, dtype=torch.bool)
        first[1:] = key[1:] != key[:-1]
        first = first.nonzero().squeeze(1)
        g, si = gid.view(-1)[key[first]], si[first]
        canvas[g] = u.view(na * k, -1)[si, 8:]
        index[g] = drawn[g // hw] + si % k
        uncovered.view(-1)[g] = False
        drawn[act] += k
        rounds += 1
        total += na * k
    stats = {"rounds": rounds, "shapes": total, "background_pixels": int(uncovered.sum())}
    images = canvas.view(n, h, w, channels).permute(0, 3, 1, 2).contiguous()
    return images, index.view(n, h, w), stats


def default_budget(device) -> int:
    """Pixel-shape pairs per round: bounds memory (~5 bytes a pair) and, on CUDA, buys
    fewer rounds (each costs kernel launches and host syncs) with some wasted work."""
    return 1 << 25 if torch.device(device).type == "cuda" else 1 << 22


class NoiseSource:
    """A noise distribution over normalised teacher inputs of one shape and device."""

    kind: str = ""
    renders_images = True  # drawn as images in [0, 1] (images()), then normalised

    def __init__(self, channels: int, size: tuple[int, int], mean: list[float],
                 std: list[float], device):
        size = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (size, size)
        if channels < 1 or min(size) < 1:
            raise KdtoolError(f"noise needs channels >= 1 and a positive size, got {channels} "
                              f"channels of {size[0]}x{size[1]}")
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != channels or len(std) != channels:
            raise KdtoolError(f"mean/std have {len(mean)}/{len(std)} values for {channels} "
                              "channels", "give one mean and one std per input channel")
        if min(std) <= 0:
            raise KdtoolError(f"normalisation std must be > 0, got {std}")
        self.channels, self.size, self.mean, self.std = channels, size, mean, std
        self.device = torch.device(device)
        # Converted once here; sample() then never copies host data to the device.
        self._mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, C, H, W) float32 on the device, in the teacher's normalised input space."""
        if n < 1:
            raise KdtoolError(f"noise batch size must be >= 1, got {n}")
        if gen.device.type != self.device.type:
            raise KdtoolError(f"noise generator is on {gen.device} but noise is made on "
                              f"{self.device}", f"use torch.Generator(device='{self.device}')")
        return self._normalised(n, gen)

    def start_epoch(self, gen: torch.Generator) -> None:
        """Called at the start of every epoch with its generator (pools refill here)."""

    def _normalised(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return self.normalise(self.images(n, gen))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self._mean) / self._std

    def images(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, C, H, W) images in [0, 1], before normalisation."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "channels": self.channels, "size": list(self.size),
                "mean": self.mean, "std": self.std, "normalised_with_mean_std": True}


class GaussianNoise(NoiseSource):
    """The paper's noise: i.i.d. N(0, 1) pixels used directly as normalised input."""

    kind = "gaussian"
    renders_images = False

    def _normalised(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.channels, *self.size, generator=gen, device=self.device)

    def describe(self) -> dict:
        return {**super().describe(), "normalised_with_mean_std": False}


class UniformNoise(NoiseSource):
    """U[0, 1] pixels in image space, then normalised like real images."""

    kind = "uniform"

    def images(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.rand(n, self.channels, *self.size, generator=gen, device=self.device)


class DeadLeavesNoise(NoiseSource):
    """Dead leaves images (Baradad et al. 2021), normalised like real images."""

    kind = "dead_leaves"

    def __init__(self, channels, size, mean, std, device, *, rmin: float = 0.03,
                 rmax: float = 1.0, alpha: float = 3.0, shapes: str = "mixed", chunk: int = 16,
                 budget: int | None = None, max_rounds: int = 64):
        super().__init__(channels, size, mean, std, device)
        _check_radii(rmin, rmax, alpha)
        check_choice(shapes, SHAPE_CHOICES, "dead leaves shapes")
        if chunk < 1 or (budget is not None and budget < 1) or max_rounds < 1:
            raise KdtoolError("dead leaves chunk, budget and max_rounds must be >= 1")
        self.options = {"rmin": float(rmin), "rmax": float(rmax), "alpha": float(alpha),
                        "shapes": shapes, "chunk": int(chunk),
                        "budget": int(budget or default_budget(self.device)),
                        "max_rounds": int(max_rounds)}
        self.last_stats: dict | None = None

    def images(self, n: int, gen: torch.Generator) -> torch.Tensor:
        images, _, self.last_stats = render_dead_leaves(
            n, gen, channels=self.channels, size=self.size, device=self.device, **self.options)
        return images

    def describe(self) -> dict:
        return {**super().describe(), **self.options,
                "background": "pixels uncovered after max_rounds get one full-canvas shape"}


_CLASSES = {"gaussian": GaussianNoise, "uniform": UniformNoise, "dead_leaves": DeadLeavesNoise}


def make_noise(kind: str, channels: int, size, mean, std, device, **options) -> NoiseSource:
    """The noise source ``kind`` (one of NOISE_KINDS) with its ``options``."""
    check_choice(kind, NOISE_KINDS, "noise kind")
    for name in options:
        if name not in _OPTIONS[kind]:
            if not _OPTIONS[kind]:
                raise KdtoolError(f"{kind} noise takes no options, got '{name}'")
            check_choice(name, _OPTIONS[kind], f"{kind} noise option")
    return _CLASSES[kind](channels, size, mean, std, device, **options)
