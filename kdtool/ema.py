"""An exponential moving average of a model's weights (``--ema DECAY``), for train and distill.

After every optimiser step the average moves towards the live weights by ``1 - d``, with
``d = min(decay, (1 + t) / (10 + t))`` at step ``t``: the warm-up keeps the first steps
from being dominated by the random initialisation (as timm's ``ModelEmaV3``). Floating
buffers (BN running statistics) are averaged the same way, integer ones copied. The
update is a few fused ``_foreach`` kernels on the training device and reads nothing back
to the host.

With EMA on, the averaged model is the one validated and written as the run's output;
the live model still trains (and its validation is reported beside it).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from kdtool.errors import KdtoolError


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def check_decay(decay: float) -> None:
    if not 0.0 <= decay < 1.0:
        raise KdtoolError(f"--ema must be in [0, 1), got {decay}",
                          "e.g. --ema 0.999 (0: off); the average spans ~1/(1-decay) steps")


class WeightEMA:
    """The averaged copy (``.module``) of ``model``; call ``update()`` after each step.

    ``model`` may be wrapped in DistributedDataParallel; the average follows the module's
    own tensors, which the optimiser updates in place.
    """

    def __init__(self, model: nn.Module, decay: float):
        check_decay(decay)
        self.decay = decay
        self.steps = 0
        live_model = unwrap(model)
        self.module = copy.deepcopy(live_model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        live = live_model.state_dict(keep_vars=True)
        ema = self.module.state_dict(keep_vars=True)
        floats = [k for k in ema if ema[k].is_floating_point()]
        ints = [k for k in ema if not ema[k].is_floating_point()]
        self._averaged = [ema[k].data for k in floats]
        self._live = [live[k].data for k in floats]
        self._copied = [(ema[k].data, live[k].data) for k in ints]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        torch._foreach_lerp_(self._averaged, self._live, 1.0 - self.current_decay())
        for e, v in self._copied:
            e.copy_(v)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "decay": self.decay, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.module.load_state_dict(state["model"])


def make_ema(model: nn.Module, decay: float) -> WeightEMA | None:
    check_decay(decay)
    return WeightEMA(model, decay) if decay > 0 else None
