"""What a plain state_dict says about the model that wrote it: its number of classes and of
input channels, read off the tensors whose shapes follow them (the classifier's rows, the
stem's input channels), so that ``--num-classes`` and ``--in-chans`` are needed only where
the shapes cannot tell.

The architecture is built twice on the meta device (no memory, no initialisers run) with
two different probe values of each; a tensor whose shape changes on one axis from one probe
value to the other, exactly as the value does, holds that value on that axis in the file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kdtool.errors import KdtoolError
from kdtool.models import build_on_meta

# Two values no architecture uses by default, so a tensor that follows them is unambiguous.
PROBES = {"num_classes": (7, 11), "in_chans": (2, 5)}


def _shapes(arch: str, arch_args: Mapping[str, Any], dims: Mapping[str, int]) -> dict:
    model = build_on_meta(arch, **dims, **arch_args)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_dims(arch: str, state: Mapping[str, torch.Tensor], known: Mapping[str, int | None],
              arch_args: Mapping[str, Any] | None = None) -> dict[str, tuple[int, str]]:
    """For each of ``num_classes`` and ``in_chans`` that ``known`` leaves None: (its value
    in ``state``, the tensor it was read from). A dimension whose tensors are missing from
    ``state`` or disagree is left out: the load that follows names the mismatch."""
    unknown = [k for k in PROBES if known.get(k) is None]
    if not unknown:
        return {}
    fixed = {k: v for k, v in known.items() if v is not None}
    try:
        a, b = (_shapes(arch, arch_args or {}, {**fixed, **{k: PROBES[k][i] for k in unknown}})
                for i in (0, 1))
    except KdtoolError:  # e.g. an architecture that takes only 3 channels: the defaults stand
        return {}
    except (NotImplementedError, RuntimeError):
        # Some constructors copy tensor data (torchvision's RegNets), which meta tensors do
        # not hold; building on the CPU instead could take gigabytes: the defaults stand.
        return {}
    found: dict[str, tuple[int, str]] = {}
    for dim in unknown:
        p, q = PROBES[dim]
        values: dict[int, str] = {}
        for name, sa in a.items():
            sb = b.get(name)
            if sb is None or len(sa) != len(sb) or name not in state:
                continue
            axes = [i for i, (x, y) in enumerate(zip(sa, sb, strict=True)) if x != y]
            if len(axes) != 1 or (sa[axes[0]], sb[axes[0]]) != (p, q):
                continue
            shape = tuple(state[name].shape)
            if len(shape) == len(sa):
                values.setdefault(shape[axes[0]], name)
        if len(values) == 1:
            (value, name), = values.items()
            if value >= 1:
                found[dim] = (value, name)
    return found
