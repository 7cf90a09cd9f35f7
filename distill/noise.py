"""Noise inputs for data-free distillation, generated on the training device.

Every batch is fresh, vectorised (no per-image Python loops, no host-device data
copies) and drawn only from the ``torch.Generator`` passed in: the same generator
state and calls give the same images on a device. Samples are in the teacher's
*normalised* input space. Dead leaves are rendered by ``distill/dead_leaves.py``.
"""

from __future__ import annotations

import torch

from kdtool.distill.dead_leaves import (
    SHAPE_CHOICES,
    check_radii,
    default_budget,
    default_leaves,
    render_dead_leaves,
)
from kdtool.errors import InternalError, KdtoolError, check_choice

NOISE_KINDS = ("gaussian", "uniform", "dead_leaves")
_OPTIONS = {"gaussian": (), "uniform": (),
            "dead_leaves": ("rmin", "rmax", "alpha", "shapes", "leaves", "budget")}
# The command-line option that sets a noise option (``kdtool distill``); the others are set
# only through the Python API (``DistillConfig.noise_options``).
CLI_OPTIONS = {"shapes": "--shapes"}


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
        # Callers are kdtool's own (the loop, the pool, benchmarks): a bad call is a bug.
        if n < 1:
            raise InternalError(f"noise batch size must be >= 1, got {n}")
        if gen.device.type != self.device.type:
            raise InternalError(f"noise generator is on {gen.device} but noise is made on "
                                f"{self.device}: use torch.Generator(device='{self.device}')")
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
                 rmax: float = 1.0, alpha: float = 3.0, shapes: str = "mixed",
                 leaves: int | None = None, budget: int | None = None):
        super().__init__(channels, size, mean, std, device)
        check_radii(rmin, rmax, alpha)
        check_choice(shapes, SHAPE_CHOICES, "dead leaves shapes")
        if (leaves is not None and leaves < 1) or (budget is not None and budget < 1):
            raise KdtoolError(f"dead leaves leaves and budget must be >= 1, got leaves={leaves}, "
                              f"budget={budget}")
        self.options = {"rmin": float(rmin), "rmax": float(rmax), "alpha": float(alpha),
                        "shapes": shapes,
                        "leaves": int(leaves or default_leaves(self.size, rmin, rmax, alpha,
                                                               shapes)),
                        "budget": int(budget or default_budget(self.device))}

    def images(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return render_dead_leaves(n, gen, channels=self.channels, size=self.size,
                                  device=self.device, **self.options)[0]

    def describe(self) -> dict:
        return {**super().describe(), **self.options,
                "background": "pixels no shape covers show one full-canvas shape behind all"}


_CLASSES = {"gaussian": GaussianNoise, "uniform": UniformNoise, "dead_leaves": DeadLeavesNoise}


def check_noise_options(kind: str, options) -> None:
    """``kind`` is one of NOISE_KINDS and takes every option named in ``options``.

    An option of another kind is named as the user set it (``--shapes``, or its key where
    no option of the command sets it) together with the ``--noise`` that takes it."""
    check_choice(kind, NOISE_KINDS, "noise kind")
    for name in options:
        if name in _OPTIONS[kind]:
            continue
        takers = [k for k in NOISE_KINDS if name in _OPTIONS[k]]
        if takers:
            what = CLI_OPTIONS.get(name, f"noise option '{name}'")
            noise = " or ".join(f"--noise {k}" for k in takers)
            raise KdtoolError(f"{what} applies to {noise} only; this run uses --noise {kind}",
                              f"drop {what}, or use {noise}" if name in CLI_OPTIONS
                              else f"drop it, or use {noise}")
        if not _OPTIONS[kind]:
            raise KdtoolError(f"{kind} noise takes no options, got '{name}'")
        check_choice(name, _OPTIONS[kind], f"{kind} noise option")


def make_noise(kind: str, channels: int, size, mean, std, device, **options) -> NoiseSource:
    """The noise source ``kind`` (one of NOISE_KINDS) with its ``options``."""
    check_noise_options(kind, options)
    return _CLASSES[kind](channels, size, mean, std, device, **options)
