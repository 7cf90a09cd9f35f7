"""Batches from an in-memory ``ImageData`` on the training device.

The whole uint8 dataset is moved to the device once; batches are indexed,
converted, augmented (random crop with zero padding + horizontal flip) and
normalised there, so a GPU is never waiting for a CPU loader.  Shuffling and
augmentation draw from generators seeded by (seed, epoch): an epoch's batches
are a function of the seed alone on a given device (CPU and CUDA generators differ),
which makes ``--resume`` exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdtool.data import ImageData


@dataclass(frozen=True)
class Augment:
    pad: int = 4
    flip: bool = True
    cutout: int = 0  # side of a square erased to the mean colour (DeVries & Taylor 2017)


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 100_003 + epoch)
    return g


def epoch_order(n: int, shuffle: bool, gen: torch.Generator,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions of an epoch's images: a permutation drawn from ``gen``, or 0..n-1."""
    return (torch.randperm(n, device=device, generator=gen) if shuffle
            else torch.arange(n, device=device))


def random_crop_flip(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Vectorised per-sample random crop (zero padding) and horizontal flip of NCHW ``x``."""
    n, _, h, w = x.shape
    if aug.pad > 0:
        p = aug.pad
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), device=x.device, generator=gen)
        dx = torch.randint(0, 2 * p + 1, (n,), device=x.device, generator=gen)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if aug.flip:
        flip = torch.rand(n, device=x.device, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square per sample of normalised NCHW ``x`` (0 = mean colour).

    Centres are uniform over the image, so squares may be clipped at the border.
    """
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), device=x.device, generator=gen)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device, generator=gen)
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    half = size // 2
    inside = (rows >= cy - half) & (rows < cy - half + size) & \
        (cols >= cx - half) & (cols < cx - half + size)
    return x * (~inside)[:, None].to(x.dtype)


class DeviceLoader:
    """Iterate normalised float batches ``(x, y)`` of ``data`` on ``device``."""

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        device: torch.device | str,
        mean: list[float],
        std: list[float],
        shuffle: bool = False,
        augment: Augment | None = None,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
    ):
        self.device = torch.device(device)
        self.x = data.x.to(self.device)
        self.y = data.y.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.seed = seed
        self.channels_last = channels_last
        shape = (1, len(mean), 1, 1)
        # Fold /255 and normalisation into one multiply-add.
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(shape)
        self.shift = (-torch.tensor(mean) / torch.tensor(std)).to(torch.float32).view(shape)
        self.scale, self.shift = self.scale.to(self.device), self.shift.to(self.device)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_images(self) -> int:
        return len(self) * self.batch_size if self.drop_last else len(self.y)

    def epoch(self, epoch: int = 0, with_index: bool = False) -> Iterator[tuple]:
        """Batches ``(x, y)``, or ``(x, y, index into the dataset)`` with ``with_index``."""
        gen = epoch_generator(self.seed, epoch, self.device)
        n = len(self.y)
        order = epoch_order(n, self.shuffle, gen, self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.x[idx]
            if self.augment is not None:
                x = random_crop_flip(x, self.augment, gen)
            x = x.float() * self.scale + self.shift
            if self.augment is not None and self.augment.cutout > 0:
                x = cutout(x, self.augment.cutout, gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield (x, self.y[idx], idx) if with_index else (x, self.y[idx])

    def __iter__(self):
        return self.epoch(0)
