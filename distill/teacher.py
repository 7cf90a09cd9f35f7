"""The teacher, frozen: no gradients, no buffer updates, BN statistics chosen per layer.

Noise distillation works because the teacher's BatchNorm layers normalise with
the statistics of the current (noise) batch.  ``FrozenTeacher`` enforces the
chosen mode on every call, whatever mode the wrapped module was left in, and
never lets a running buffer change (see ``kdtool.bn.batch_stats``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from kdtool.bn import batch_stats, bn_layers, global_batch_stats
from kdtool.distill.align import batch_aligned, per_sample_norms
from kdtool.errors import KdtoolError, check_choice

TEACHER_BN_MODES = ("current", "running", "mixed")
TEACHER_STATS = ("rank", "global")  # under torchrun: each process's batch, or all of them
_OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm)


def choose_running_layers(names: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded random choice of round(fraction x n) layer names (half rounds up)."""
    if not 0.0 <= fraction <= 1.0:
        raise KdtoolError(f"--running-fraction must be in [0, 1], got {fraction}")
    k = math.floor(fraction * len(names) + 0.5)
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(names), generator=gen)[:k].tolist()
    return [names[i] for i in sorted(picked)]


class FrozenTeacher:
    """Callable teacher: ``teacher(x)`` -> logits, computed under inference mode.

    ``bn_mode``: ``current`` (every BN layer on batch statistics: the method),
    ``running`` (classic KD: running statistics; the failure baseline) or
    ``mixed`` (``running_fraction`` of the BN layers, chosen with ``seed``, on
    running statistics and the rest on current statistics).

    ``stats="global"``: under torch.distributed, the current-statistics layers normalise
    with the statistics of every process's batch (``kdtool.bn.global_batch_stats``).
    ``norm_align``: per-sample normalisers (GroupNorm, LayerNorm, InstanceNorm) are
    batch-aligned (``kdtool.distill.align``); a teacher without BN needs it.

    Not an ``nn.Module`` on purpose: it can never be registered in a student, an
    optimiser or a DDP wrapper by accident.
    """

    def __init__(self, model: nn.Module, bn_mode: str = "current",
                 running_fraction: float | None = None, seed: int = 0, source: str = "teacher",
                 norm_align: bool = False, stats: str = "rank"):
        check_choice(bn_mode, TEACHER_BN_MODES, "--teacher-bn mode")
        check_choice(stats, TEACHER_STATS, "--teacher-stats")
        layers = bn_layers(model)
        aligned = [m for _, m in per_sample_norms(model)] if norm_align else []
        if norm_align and not aligned:
            raise KdtoolError(
                f"--teacher-norm-align: {source} has no GroupNorm, LayerNorm or InstanceNorm "
                "layer to align", "drop --teacher-norm-align")
        if not layers and not aligned:
            others = sorted({type(m).__name__ for m in model.modules()
                             if isinstance(m, _OTHER_NORMS)})
            found = f" (it normalises with {', '.join(others)})" if others else ""
            raise KdtoolError(
                f"{source} has no BatchNorm layers{found}: noise distillation needs a teacher "
                "whose BatchNorm layers can normalise with the statistics of the noise batch, "
                "which realigns noise activations with those of real data",
                "use a teacher with BatchNorm layers" + (
                    ", or try --teacher-norm-align (batch alignment of its per-sample "
                    "normalisers, beyond the paper)" if others else ""))
        if not layers and bn_mode != "current":
            raise KdtoolError(f"--teacher-bn {bn_mode} needs BatchNorm layers; {source} has "
                              "none", "drop --teacher-bn")
        self._aligned = aligned
        self.stats = stats
        names = [n for n, _ in layers]
        if bn_mode == "mixed":
            if running_fraction is None:
                raise KdtoolError("--teacher-bn mixed needs --running-fraction P (0..1)")
            running = choose_running_layers(names, running_fraction, seed)
        else:
            if running_fraction is not None:
                raise KdtoolError(f"--running-fraction applies to --teacher-bn mixed, not "
                                  f"'{bn_mode}'", "drop it or use --teacher-bn mixed")
            running = names if bn_mode == "running" else []
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.bn_mode = bn_mode
        self.running_fraction = running_fraction
        self.running_layers = running
        chosen = set(running)
        self._current = [m for n, m in layers if n not in chosen]
        self.num_bn = len(layers)

    def to(self, device: torch.device | str, memory_format=None) -> FrozenTeacher:
        self.model.to(device, memory_format=memory_format)
        return self

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor, stats: str | None = None) -> torch.Tensor:
        """The teacher's answers; ``stats="rank"`` overrides a global teacher for a call that
        one process makes alone (its all-reduce would wait for ranks that never join)."""
        self.model.eval()  # dropout off, and running-statistics layers really on running stats
        glob = (stats or self.stats) == "global" and self._global()
        bn = global_batch_stats(self._current) if glob else batch_stats(self.model, self._current)
        with bn, batch_aligned(self._aligned):
            return self.model(x)

    @staticmethod
    def _global() -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def describe(self) -> dict:
        return {"bn_mode": self.bn_mode, "running_fraction": self.running_fraction,
                "bn_layers": self.num_bn, "running_layers": self.running_layers,
                "aligned_layers": len(self._aligned), "stats": self.stats}
