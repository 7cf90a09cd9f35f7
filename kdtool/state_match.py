"""Matching a plain state_dict to the architecture named for it, before any weight moves.

A foreign file is checked on the meta device (no memory, no initialisers) against its
``--arch``: a wrapper's key prefix that every tensor carries (PyTorch Lightning's ``model.``)
comes off when that makes the names match, and a mismatch says which of the other
families' architecture of the same name (``tv:resnet18`` for ``resnet18``) the tensors do
match: their stems differ, and a user can hardly tell them apart otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kdtool.errors import KdtoolError
from kdtool.models import build_on_meta
from kdtool.models._registry import TIMM_PREFIX, TV_PREFIX

Shapes = dict[str, tuple[int, ...]]


def expected_shapes(arch: str, **kwargs) -> Shapes | None:
    """Every tensor's shape in ``arch`` built with ``kwargs``; None where it cannot be built
    on the meta device (torchvision's RegNets copy tensor data): the load then checks."""
    try:
        return {k: tuple(v.shape) for k, v in build_on_meta(arch, **kwargs).state_dict().items()}
    except (NotImplementedError, RuntimeError):
        return None


def mismatch(expected: Shapes, state: Mapping[str, torch.Tensor],
             source: str) -> tuple[str, str] | None:
    """(message, hint) for the first tensor of ``state`` that ``expected`` disagrees with."""
    for name, shape in expected.items():
        if name not in state:
            named = f" (its own are named like '{next(iter(state))}')" if state else ""
            return (f"'{source}' lacks tensor '{name}' that the architecture needs{named}",
                    "check --arch and its arguments against the model that wrote the file")
        if tuple(state[name].shape) != shape:
            return (f"shape mismatch in '{source}' at '{name}': file "
                    f"{tuple(state[name].shape)}, architecture {shape}",
                    "check --arch, --num-classes and --in-chans")
    extra = sorted(set(state) - set(expected))
    if extra:
        return (f"'{source}' has tensor '{extra[0]}' the architecture does not have"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""),
                "check --arch against the model that wrote the file")
    return None


def strip_common_prefix(state: dict[str, torch.Tensor],
                        names: set[str]) -> tuple[dict[str, torch.Tensor], str | None]:
    """``state`` without the dotted prefix that every key carries, when removing it (once
    or repeatedly: ``model.net.``) turns the keys into ``names``; else ``state`` as it is."""
    if set(state) == names or not state:
        return state, None
    keys, prefix = list(state), ""
    while all("." in k for k in keys):
        head = keys[0].split(".", 1)[0] + "."
        if not all(k.startswith(head) for k in keys):
            break
        prefix += head
        keys = [k[len(head):] for k in keys]
        if set(keys) == names:
            return dict(zip(keys, state.values(), strict=True)), prefix
    return state, None


def sibling_archs(arch: str) -> list[str]:
    """The same name in kdtool's, torchvision's and timm's families, ``arch`` excepted."""
    base = arch.removeprefix(TV_PREFIX).removeprefix(TIMM_PREFIX)
    return [a for a in (base, TV_PREFIX + base, TIMM_PREFIX + base) if a != arch]


def matching_sibling(arch: str, state: Mapping[str, torch.Tensor], dims) -> str | None:
    """The first sibling architecture (``sibling_archs``) whose tensors ``state`` matches,
    names and shapes, its classes and channels read from ``state`` as for ``--arch``;
    ``dims(arch)`` gives those keyword arguments."""
    for other in sibling_archs(arch):
        try:
            shapes = expected_shapes(other, **dims(other))
        except (KdtoolError, ImportError):  # not an architecture there, or timm is missing
            continue
        if shapes is not None and mismatch(shapes, state, "") is None:
            return other
    return None
