"""Dead leaves images (Baradad et al. 2021), rendered on the device without host syncs.

The model: shapes with uniform centres, radii p(r) ~ r^-alpha on [rmin, rmax]
(fractions of the image's longer side) and uniform colours, stacked in random
depth order; each pixel shows the frontmost shape that covers it.

The renderer draws a fixed number of shapes per image (``leaves``, by default
enough that an image's interior pixels are all covered but for e^-6 of a pixel
on average; an uncovered pixel shows a background colour, one full-canvas shape
behind all others).  Each shape is tested only on the pixels of a square window around it,
and every pixel keeps the smallest depth that covers it (a scatter-min).  The
window sizes come from a plan fixed by (leaves, size, radii, shapes) alone:
radii are stratified (shape j draws its radius from the j-th of ``leaves``
equal-probability strata) and shape kinds cycle through the kinds in use, so
each shape's largest possible window is known before any random number is drawn.
Every tensor therefore has a fixed size: no ``nonzero``, no reads back to the
host, and the same number of kernels for every batch.  Stratification changes
no shape's distribution (each shape's radius, over its random depth, follows
p(r) exactly); it only evens out the mix within one image.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kdtool.errors import KdtoolError, check_choice

SHAPES = ("circle", "square", "rotated_square", "rectangle", "triangle", "quadrilateral")
SHAPE_CHOICES = (*SHAPES, "mixed")
# Mean area in units of r^2 (r: the radius drawn): random inscribed triangles and
# quadrilaterals average 3/(2 pi) and 3/pi of r^2; rectangles 4 x E[aspect] = 2.5.
MEAN_AREA = {"circle": math.pi, "square": 4.0, "rotated_square": 4.0, "rectangle": 2.5,
             "triangle": 3 / (2 * math.pi), "quadrilateral": 3 / math.pi}
# Half-extent of each kind's bounding box in units of r: only a rotated square reaches
# beyond its radius (its corners, at r sqrt 2).
EXTENT = {"circle": 1.0, "square": 1.0, "rotated_square": math.sqrt(2), "rectangle": 1.0,
          "triangle": 1.0, "quadrilateral": 1.0}
# Default leaves: about e^-COVERAGE uncovered interior pixels per image, whatever its size.
COVERAGE = 6.0
MAX_LEAVES = 1 << 16
_EPS = 1e-4  # window margin in pixels, for float rounding at a shape's edge
# Ratio of successive window sides; each side is one group of ~40 kernels.
WINDOW_GROWTH = 1.3


def check_radii(rmin: float, rmax: float, alpha: float) -> None:
    if not (0 < rmin <= rmax):
        raise KdtoolError(f"dead leaves radii need 0 < rmin <= rmax, got rmin={rmin}, rmax={rmax}",
                          "radii are fractions of the image size, e.g. rmin=0.03 rmax=1")
    if not math.isfinite(alpha):
        raise KdtoolError(f"dead leaves alpha must be a finite number, got {alpha}")


def radii_from_uniform(u: torch.Tensor, rmin: float, rmax: float, alpha: float) -> torch.Tensor:
    if abs(alpha - 1.0) < 1e-12:  # p ~ 1/r: log-uniform
        return rmin * (rmax / rmin) ** u
    e = 1.0 - alpha
    lo, hi = rmin**e, rmax**e
    return (lo + u * (hi - lo)).pow(1.0 / e).clamp_(rmin, rmax)  # clamp: float rounding only


def stratified_radii(stratum: torch.Tensor, u: torch.Tensor, leaves: int, rmin: float,
                     rmax: float, alpha: float) -> torch.Tensor:
    """Radius of each slot: uniform ``u`` within the slot's stratum of the CDF, so each
    radius over a random slot follows p(r) and one image's radii cover every stratum."""
    return radii_from_uniform((stratum + u) / leaves, rmin, rmax, alpha)


def mean_r2(rmin: float, rmax: float, alpha: float) -> float:
    """E[r^2] under p(r) ~ r^-alpha on [rmin, rmax]."""
    if rmin == rmax:
        return rmin * rmin

    def integral(p: float) -> float:  # of r^p over [rmin, rmax]
        return math.log(rmax / rmin) if abs(p + 1) < 1e-12 else (
            rmax ** (p + 1) - rmin ** (p + 1)) / (p + 1)

    return integral(2 - alpha) / integral(-alpha)


def shape_constraints(kind: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor,
                      u: torch.Tensor) -> torch.Tensor:
    """Half-space rows (..., 4, 4): (x, y) is inside iff a0 x + a1 y + a2 (x^2+y^2) + a3 >= 0
    for every row a. ``kind`` indexes SHAPES; ``u`` (..., 4) uniforms set orientation,
    aspect ratio and vertex angles (``KIND_ROWS`` has each kind's construction)."""
    rows = torch.empty(*kind.shape, 4, 4, device=r.device, dtype=r.dtype)
    for k, fn in enumerate(KIND_ROWS):
        m = kind == k
        if m.any():
            rows[m] = fn(cx[m], cy[m], r[m], u[m])
    return rows


def _circle(cx, cy, r, u):
    rows = torch.zeros(*r.shape, 4, 4, device=r.device, dtype=r.dtype)
    rows[..., 3] = 1.0  # rows 1..3: 1 >= 0, always true
    rows[..., 0, :] = torch.stack([2 * cx, 2 * cy, -torch.ones_like(cx),
                                   r * r - cx * cx - cy * cy], dim=-1)
    return rows


_BOX = ((0, 1.0), (0, -1.0), (1, 1.0), (1, -1.0))  # (axis, sign) of each row


def _box(cx, cy, hx, hy):
    """Axis-aligned box of half-sides hx, hy: x >= cx - hx, x <= cx + hx, the same in y."""
    rows = torch.zeros(*cx.shape, 4, 4, device=cx.device, dtype=cx.dtype)
    for i, (axis, sign) in enumerate(_BOX):
        rows[..., i, axis] = sign
        rows[..., i, 3] = (hx if axis == 0 else hy) - sign * (cx if axis == 0 else cy)
    return rows


def _square(cx, cy, r, u):
    return _box(cx, cy, r, r)


def _rectangle(cx, cy, r, u):
    short = r * _aspect(u)  # u[1] puts the long side along x or y
    wide = u[..., 1] < 0.5
    return _box(cx, cy, torch.where(wide, r, short), torch.where(wide, short, r))


def _polygon(cx, cy, rad, ang):
    """4 counter-clockwise vertices at angles ``ang`` on a circle: inside = left of every
    edge (convex); a repeated vertex gives the row 0 >= 0."""
    vx = cx[..., None] + rad[..., None] * torch.cos(ang)
    vy = cy[..., None] + rad[..., None] * torch.sin(ang)
    ex, ey = vx.roll(-1, dims=-1) - vx, vy.roll(-1, dims=-1) - vy
    return torch.stack([-ey, ex, torch.zeros_like(ex), ey * vx - ex * vy], dim=-1)


def _rotated_square(cx, cy, r, u):
    corner = math.pi / 4 + torch.arange(4, device=r.device, dtype=r.dtype) * (math.pi / 2)
    return _polygon(cx, cy, r * math.sqrt(2), corner + u[..., :1] * (math.pi / 2))


def _triangle(cx, cy, r, u):
    ang = torch.sort(u[..., :3], dim=-1).values
    return _polygon(cx, cy, r, torch.cat([ang, ang[..., 2:]], dim=-1) * (2 * math.pi))


def _quadrilateral(cx, cy, r, u):
    return _polygon(cx, cy, r, torch.sort(u, dim=-1).values * (2 * math.pi))


KIND_ROWS = (_circle, _square, _rotated_square, _rectangle, _triangle, _quadrilateral)


def _aspect(u: torch.Tensor) -> torch.Tensor:
    # rectangle: half-sides r and r*s, s in [0.25, 1]
    return 0.25 + 0.75 * u[..., 0]


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


def shape_masks(rows: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., 4, 4) constraint rows -> (..., H, W) bool masks on the full canvas.

    Element-wise, not a matmul: a TF32 matmul on CUDA would round the circle rows,
    whose terms nearly cancel, and wreck small shapes.
    """
    f = pixel_features(size, rows.device)
    r = rows[..., None, :, :]
    v = (r[..., :3] * f[..., None, :3]).sum(-1) + r[..., 3]
    return (v >= 0).all(-1).view(*rows.shape[:-2], *size)


def default_leaves(size: tuple[int, int], rmin: float, rmax: float, alpha: float,
                   shapes: str) -> int:
    """Shapes per image: enough that an image's H x W interior pixels are all covered but
    for e^-6 of one pixel on average (each is missed with probability e^-(ln HW + 6))."""
    kinds = SHAPES if shapes == "mixed" else (shapes,)
    area = sum(MEAN_AREA[k] for k in kinds) / len(kinds) * mean_r2(rmin, rmax, alpha)
    h, w = size
    canvas = h * w / max(h, w) ** 2  # in units of the longer side squared
    leaves = math.ceil((math.log(h * w) + COVERAGE) * canvas / area / 64) * 64
    return min(max(leaves, 64), MAX_LEAVES)


def default_budget(device) -> int:
    """Pixel tests per chunk of images: bounds the memory of one window group."""
    return 1 << 26 if torch.device(device).type == "cuda" else 1 << 23


@dataclass(frozen=True)
class _Plan:
    """What rendering ``leaves`` shapes per image needs, fixed before any random draw.

    Slots are in kind-major order: ``kinds[i]`` owns slots ``[bounds[i], bounds[i+1])``,
    and slot p draws its radius from stratum ``stratum[p]`` of ``leaves`` equal-probability
    strata.  ``by_side`` lists the slots by window side; ``groups`` (start, end, side)
    are ranges of that list sharing a side, which bounds the shape for any radius of its
    stratum.  ``max_origin`` (2, leaves): the last window origin (x, y) inside the canvas.
    """

    kinds: tuple[int, ...]
    bounds: tuple[int, ...]
    stratum: torch.Tensor
    extent: torch.Tensor
    by_side: torch.Tensor
    groups: tuple[tuple[int, int, int], ...]
    max_origin: torch.Tensor
    ranks: torch.Tensor  # 0 .. leaves - 1, int32


@functools.lru_cache(maxsize=32)
def _plan(leaves: int, size: tuple[int, int], rmin: float, rmax: float, alpha: float,
          shapes: str, device: torch.device, growth: float = WINDOW_GROWTH) -> _Plan:
    """Cached per device: rendering then copies nothing from the host."""
    h, w = size
    scale = max(h, w)
    kinds = tuple(range(len(SHAPES))) if shapes == "mixed" else (SHAPES.index(shapes),)
    # Kinds cycle over the strata (stratum j gets kind j mod K), then slots are grouped
    # by kind so that each kind's rows are built on one contiguous slice.
    j = torch.arange(leaves)
    slot_kind = j % len(kinds)
    stratum = torch.argsort(slot_kind, stable=True)
    slot_kind = slot_kind[stratum]
    bounds = (0, *torch.bincount(slot_kind, minlength=len(kinds)).cumsum(0).tolist())
    extent = torch.tensor([EXTENT[SHAPES[k]] for k in kinds], dtype=torch.float64)[slot_kind]
    r_top = radii_from_uniform((stratum.double() + 1) / leaves, rmin, rmax, alpha)
    need = torch.floor(2 * extent * r_top * scale + 2 * _EPS).long() + 1
    # A geometric ladder of window sides: a larger growth makes fewer groups (fewer, larger
    # kernels) and wastes more pixel tests on windows larger than their shapes need.
    ladder, side = [], 1
    while side < scale:
        ladder.append(side)
        side = max(side + 1, round(side * growth))
    ladder.append(scale)
    ladder = torch.tensor(ladder)
    sides = ladder[torch.searchsorted(ladder, need.clamp(max=scale))]
    by_side = torch.argsort(sides, stable=True)
    sorted_sides = sides[by_side].tolist()
    groups, start = [], 0
    for end in range(1, leaves + 1):
        if end == leaves or sorted_sides[end] != sorted_sides[start]:
            groups.append((start, end, sorted_sides[start]))
            start = end
    max_origin = torch.stack([w - sides.clamp(max=w), h - sides.clamp(max=h)]).int()
    return _Plan(kinds, bounds, stratum.to(device), extent.float().to(device),
                 by_side.to(device), tuple(groups), max_origin.to(device),
                 torch.arange(leaves, dtype=torch.int32, device=device))


def render_dead_leaves(n: int, gen: torch.Generator, *, channels: int, size: tuple[int, int],
                       device, rmin: float = 0.03, rmax: float = 1.0, alpha: float = 3.0,
                       shapes: str = "mixed", leaves: int | None = None,
                       budget: int | None = None, window_growth: float | None = None):
    """Image-space dead leaves batch: ``(images (n, C, H, W) in [0, 1], index (n, H, W))``.

    ``index`` is the depth of the shape seen at each pixel (0 = frontmost, among
    ``leaves`` per image), -1 where no shape covers the pixel and the background
    colour shows.  No host synchronisation: fixed sizes throughout.
    """
    check_choice(shapes, SHAPE_CHOICES, "dead leaves shapes")
    check_radii(rmin, rmax, alpha)
    device = torch.device(device)
    h, w = size
    leaves = leaves or default_leaves(size, rmin, rmax, alpha, shapes)
    budget = budget or default_budget(device)
    scale, hw = max(h, w), h * w
    growth = WINDOW_GROWTH if window_growth is None else window_growth
    if not growth > 1:
        raise KdtoolError(f"dead leaves window growth must be > 1, got {growth}")
    plan = _plan(leaves, (h, w), rmin, rmax, alpha, shapes, device, growth)
    u = torch.rand(n, leaves, 7, generator=gen, device=device)
    r = stratified_radii(plan.stratum, u[..., 2], leaves, rmin, rmax, alpha)
    cx, cy = u[..., 0] * (w / scale), u[..., 1] * (h / scale)
    rows = torch.empty(n, leaves, 4, 4, device=device)
    for i, k in enumerate(plan.kinds):  # each kind's own construction, on its slice
        part = slice(plan.bounds[i], plan.bounds[i + 1])
        rows[:, part] = KIND_ROWS[k](cx[:, part], cy[:, part], r[:, part], u[:, part, 3:])
    # Window origin: the first pixel centre inside the shape's bounding box (its window
    # side covers the largest box of its stratum), moved to stay inside the canvas.
    ext = plan.extent * r
    ox = torch.ceil((cx - ext) * scale - 0.5 - _EPS).int().clamp_(min=0)
    oy = torch.ceil((cy - ext) * scale - 0.5 - _EPS).int().clamp_(min=0)
    first = (torch.arange(n, device=device) * hw)[:, None]  # int64: scatter's index type
    first = first + torch.minimum(oy, plan.max_origin[1]) * w + torch.minimum(
        ox, plan.max_origin[0])  # flat index of each window's first pixel
    rows, first = rows[:, plan.by_side], first[:, plan.by_side]
    # Depth: a random permutation of each image's shapes (ranks of random keys); the
    # colours are drawn per depth, the background's last.
    perm = torch.rand(n, leaves, generator=gen, device=device).argsort(1)
    depth = torch.empty(n, leaves, dtype=torch.int32, device=device).scatter_(
        1, perm, plan.ranks.expand(n, -1))
    colours = torch.rand(n, leaves + 1, channels, generator=gen, device=device)
    front = torch.full((n * hw,), leaves, dtype=torch.int32, device=device)
    for start, end, side in plan.groups:
        step = max(1, budget // (4 * (end - start) * side * side))
        for i in range(0, n, step):
            part = (slice(i, i + step), slice(start, end))
            _stamp(front, rows[part], first[part], depth[part], side, (h, w), leaves)
    front = front.view(n, hw).long()
    images = torch.gather(colours, 1, front[..., None].expand(-1, -1, channels))
    images = images.view(n, h, w, channels).permute(0, 3, 1, 2).contiguous()
    index = torch.where(front == leaves, -1, front).view(n, h, w)
    return images, index


def _stamp(front: torch.Tensor, rows: torch.Tensor, first: torch.Tensor, depth: torch.Tensor,
           side: int, size: tuple[int, int], none: int) -> None:
    """Scatter-min each shape's depth into the pixels of its window that it covers."""
    h, w = size
    scale = max(h, w)
    sx, sy = min(side, w), min(side, h)
    dev = rows.device
    local = first % (h * w)
    px = (local % w)[..., None] + torch.arange(sx, device=dev)  # (n, m, sx)
    py = (local // w)[..., None] + torch.arange(sy, device=dev)
    x, y = (px + 0.5) / scale, (py + 0.5) / scale
    # Each half-space row splits into a column part and a row part:
    # a0 x + a2 x^2 >= -(a1 y + a2 y^2 + a3), one comparison per pixel and row.
    a = rows[..., None]  # (n, m, 4, 4, 1)
    col = a[..., 0, :] * x[:, :, None] + a[..., 2, :] * (x * x)[:, :, None]  # (n, m, 4, sx)
    row = -(a[..., 1, :] * y[:, :, None] + a[..., 2, :] * (y * y)[:, :, None] + a[..., 3, :])
    inside = col[:, :, 0, None, :] >= row[:, :, 0, :, None]  # (n, m, sy, sx)
    for k in range(1, 4):
        inside &= col[:, :, k, None, :] >= row[:, :, k, :, None]
    key = torch.where(inside, depth[..., None, None], none)
    offsets = torch.arange(sy, device=dev)[:, None] * w + torch.arange(sx, device=dev)
    pix = first[..., None, None] + offsets
    front.scatter_reduce_(0, pix.view(-1), key.view(-1), "amin")
