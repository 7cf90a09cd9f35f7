"""A pool of rendered noise images, reused with transforms that keep their distribution.

Fresh dead leaves cost a sizeable share of a small step (docs/BENCHMARKS.md:
about as much as a ResNet-8 -> tiny CNN step on the CPU).  ``PooledNoise``
renders ``size`` images at the start of every epoch (from that epoch's
generator, so ``--resume`` stays exact) and draws each batch from the pool,
each image under a random transform from a group that maps the dead-leaves
distribution onto itself: the 8 flips and quarter turns of the square
(centres are uniform, shape orientations isotropic), a permutation of the
colour channels and a colour inversion x -> 1 - x (colours are independent
uniform per channel). A pool of 4,096 is 16 batches of 256 rendered per
196-step epoch: about 8% of the cost of fresh batches.

What reuse costs (CIFAR-10, 5 seeds, docs/BENCHMARKS.md): each image drawn ~12 or
~6 times an epoch, 0.7-0.9 points below fresh noise; ~1.6 times, level with it.
"""

from __future__ import annotations

import itertools

import torch

from kdtool.distill.noise import NoiseSource
from kdtool.errors import KdtoolError

DEFAULT_POOL = 4096
RENDER_CHUNK = 256  # images rendered per call when filling the pool (bounds memory)


class PooledNoise:
    """A NoiseSource facade over a per-epoch pool of ``source``'s images."""

    def __init__(self, source: NoiseSource, size: int = DEFAULT_POOL):
        if size < 1:
            raise KdtoolError(f"--noise-pool must be >= 1 (or 0 for fresh noise), got {size}")
        if not source.renders_images:
            raise KdtoolError(f"{source.kind} noise is drawn in the normalised space and costs "
                              "almost nothing: a pool would only repeat it",
                              "use --noise-pool with dead_leaves or uniform noise")
        self.source, self.size = source, size
        self.kind, self.device = source.kind, source.device
        self.channels = source.channels
        perms = list(itertools.permutations(range(self.channels))) if self.channels <= 4 else [
            tuple(range(self.channels))]
        self._perms = torch.tensor(perms, device=self.device)
        self._pool: torch.Tensor | None = None
        self.renders = 0  # images rendered so far (what the pool costs)

    def start_epoch(self, gen: torch.Generator) -> None:
        chunks = []
        for start in range(0, self.size, RENDER_CHUNK):
            chunks.append(self.source.images(min(RENDER_CHUNK, self.size - start), gen))
        self._pool = torch.cat(chunks)
        self.renders += self.size

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self._pool is None:
            self.start_epoch(gen)
        dev = self.device
        idx = torch.randint(self.size, (n,), generator=gen, device=dev)
        x = self._pool[idx]
        # One random element of the symmetry group per image, applied batch-wise by masks.
        r = torch.randint(1 << 16, (n,), generator=gen, device=dev)
        x = torch.where((r & 1).bool().view(-1, 1, 1, 1), x.flip(3), x)
        if x.shape[2] == x.shape[3]:  # quarter turns only keep the shape of square images
            x = torch.where((r & 2).bool().view(-1, 1, 1, 1), x.transpose(2, 3), x)
        x = torch.where((r & 4).bool().view(-1, 1, 1, 1), x.flip(2), x)
        x = torch.where((r & 8).bool().view(-1, 1, 1, 1), 1.0 - x, x)
        perm = self._perms[(r >> 4) % len(self._perms)]  # (n, C)
        x = torch.gather(x, 1, perm.view(n, -1, 1, 1).expand_as(x))
        return self.source.normalise(x)

    def describe(self) -> dict:
        h, w = self.source.size
        variants = (8 if h == w else 4) * 2 * len(self._perms)
        return {**self.source.describe(), "pool": self.size, "pool_refresh": "every epoch",
                "pool_transforms": "flips, quarter turns, channel permutation, inversion",
                "pool_variants_per_image": variants}
