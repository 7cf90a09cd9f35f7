"""Fold eval-mode BatchNorm into convolution / linear weights.

``fold_bn(model)`` returns a copy of ``model`` without any BatchNorm module and
the same eval-mode outputs: each BN is folded into the conv/linear before it
(output channels) or after it (input channels) where that is exact
(``fold_graph`` decides), and otherwise replaced by a ``ChannelAffine``, the
per-channel scale-and-shift an eval-mode BN computes.  Folded BNs become
``nn.Identity`` in place, so the module tree, its names and the model's own
``forward`` stay those of the original architecture; a conv that absorbs a BN
gains a bias if it had none.

That makes a folded checkpoint rebuildable from its plan alone
(``FoldReport.plan()``, stored in the checkpoint metadata): ``apply_plan``
performs the same structural changes on a freshly built architecture, and the
saved state_dict then loads with exactly matching keys.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdtool.bn import bn_layers, bn_tail
from kdtool.calibrate.fold_graph import (
    ACTIONS,
    AFFINE,
    INTO_NEXT,
    INTO_PREV,
    METHODS,
    FoldEntry,
    analyse,
)
from kdtool.errors import InternalError, KdtoolError

__all__ = [
    "AFFINE",
    "DEFAULT_TOLERANCE",
    "INTO_NEXT",
    "INTO_PREV",
    "PLAN_VERSION",
    "ChannelAffine",
    "FoldEntry",
    "FoldReport",
    "apply_plan",
    "fold_bn",
    "logit_scale",
    "max_abs_diff",
]

PLAN_VERSION = 1
DEFAULT_TOLERANCE = 1e-4  # max abs logit difference, folded vs unfolded, float32


class ChannelAffine(nn.Module):
    """``x * weight + bias`` per channel (dim 1): an eval-mode BN that could not be folded."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return str(self.num_features)


@dataclass
class FoldReport:
    """One entry per BN of the input model: what it was folded into, or why it was kept."""

    entries: list[FoldEntry]

    @property
    def folded(self) -> list[FoldEntry]:
        return [e for e in self.entries if e.action != AFFINE]

    @property
    def kept(self) -> list[FoldEntry]:
        return [e for e in self.entries if e.action == AFFINE]

    def counts(self) -> dict[str, int]:
        return {a: sum(e.action == a for e in self.entries) for a in ACTIONS}

    def summary(self) -> str:
        c = self.counts()
        return (
            f"{len(self.entries)} BatchNorm layers: {c[INTO_PREV]} folded into the conv/linear"
            f" before, {c[INTO_NEXT]} into the conv/linear after, {c[AFFINE]} kept as "
            "per-channel scale-and-shift"
        )

    def plan(self) -> dict:
        """The JSON structural plan that ``apply_plan`` replays on a fresh model."""
        return {"version": PLAN_VERSION, "layers": [asdict(e) for e in self.entries]}

    @classmethod
    def from_plan(cls, plan: dict) -> FoldReport:
        try:
            if plan.get("version") != PLAN_VERSION:
                raise ValueError(f"unknown version {plan.get('version')!r}")
            entries = [FoldEntry(**layer) for layer in plan["layers"]]
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise KdtoolError(
                f"malformed BatchNorm fold plan in the metadata: {e}",
                "re-create the file with 'kdtool calibrate'",
            ) from None
        for e in entries:
            if (
                e.action not in ACTIONS
                or e.method not in METHODS
                or (e.action == AFFINE) != (e.target is None)
            ):
                raise KdtoolError(
                    f"malformed BatchNorm fold plan entry {asdict(e)}",
                    "re-create the file with 'kdtool calibrate'",
                )
        return cls(entries)


def _check_foldable(model: nn.Module) -> None:
    for name, bn in bn_layers(model):
        if not bn.track_running_stats or bn.running_mean is None:
            raise KdtoolError(
                f"BatchNorm layer '{name}' keeps no running statistics "
                "(track_running_stats=False): it always normalises with its batch",
                "such a layer has no eval-mode transform to fold; rebuild it with "
                "track_running_stats=True",
            )
        if bn_tail(bn) is None:  # its eval forward is not (x - mean) / std * weight + bias
            raise KdtoolError(
                f"BatchNorm layer '{name}' is a {type(bn).__name__} with a forward of its own: "
                "folding it as a plain BatchNorm would change it",
                "rebuild the model with plain BatchNorm layers (fused BN + activation layers "
                "of timm are folded as such)",
            )
        if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
            raise KdtoolError(
                f"BatchNorm layer '{name}' is uninitialised (lazy)",
                "run one forward pass before folding",
            )


def fold_bn(
    model: nn.Module, example: torch.Tensor | None = None, tolerance: float = DEFAULT_TOLERANCE
) -> tuple[nn.Module, FoldReport]:
    """A BN-free copy of ``model`` (eval mode) with the same outputs, and what was done.

    ``model`` is not modified.  ``example`` (a normalised input batch) lets BNs of
    modules that torch.fx cannot trace be folded after a forward pass confirms the
    data flow; such folds are checked on ``example`` (max abs difference <=
    ``tolerance`` x ``logit_scale``) and kept as scale-and-shift if the check fails.
    """
    _check_foldable(model)
    training = model.training
    model.eval()
    try:
        entries = analyse(model, example)
        folded = _folded_copy(model, entries)
        guessed = [e for e in entries if e.method == "pattern" and e.action != AFFINE]
        if guessed and max_abs_diff(model, folded, example) > tolerance * logit_scale(
                model, example):
            for e in guessed:  # a named-order pairing was wrong: keep those BNs exact
                e.action, e.target = AFFINE, None
                e.reason = "folding it changed the outputs (its conv's output has other uses)"
            folded = _folded_copy(model, entries)
    finally:
        model.train(training)
    return folded, FoldReport(entries)


def _folded_copy(model: nn.Module, entries: list[FoldEntry]) -> nn.Module:
    folded = copy.deepcopy(model).eval()
    _apply(folded, entries, compute=True)
    return folded


def apply_plan(model: nn.Module, plan: dict) -> nn.Module:
    """Make a freshly built ``model`` structurally what ``fold_bn`` made of it (in place).

    Values do not matter: the folded checkpoint's state_dict is loaded afterwards.
    """
    entries = FoldReport.from_plan(plan).entries
    have = {n for n, _ in bn_layers(model)}
    want = {e.bn for e in entries}
    if have != want:
        diff = sorted(have ^ want)
        raise KdtoolError(
            f"the BatchNorm fold plan does not match the architecture (e.g. layer '{diff[0]}', "
            f"{len(diff)} differences)",
            "the file was folded from another architecture or version; re-create it with "
            "'kdtool calibrate'",
        )
    _apply(model, entries, compute=False)
    return model


@torch.no_grad()
def logit_scale(model: nn.Module, x: torch.Tensor) -> float:
    """The unit of the fold tolerance: ``model``'s largest abs logit on ``x``, at least 1.
    float32 rounding grows with the logits: folding a MobileNetV3 whose logits reach 83
    moves them by 1.2e-4, where the same fold in float64 moves them by 2e-13."""
    return max(1.0, model(x).float().abs().max().item())


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between the float32 outputs of ``a`` and ``b`` on ``x``."""
    return (a(x).float() - b(x).float()).abs().max().item()


# ----------------------------------------------------------------------------- the arithmetic


def _bn_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as ``scale * x + shift`` per channel, in float64."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _ensure_bias(layer: nn.Module) -> None:
    if layer.bias is None:
        w = layer.weight
        layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))


@torch.no_grad()
def _fold_before(layer: nn.Module, bn: _BatchNorm) -> None:
    """bn(layer(x)) -> layer'(x): scale the output channels, shift the bias."""
    scale, shift = _bn_affine(bn)
    w = layer.weight
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
    view = (-1,) + (1,) * (w.dim() - 1)
    new_w = w.double() * scale.view(view)
    _ensure_bias(layer)
    w.copy_(new_w.to(w.dtype))
    layer.bias.copy_((b * scale + shift).to(w.dtype))


@torch.no_grad()
def _fold_after(layer: nn.Module, bn: _BatchNorm) -> None:
    """layer(bn(x)) -> layer'(x): scale the input channels, add the weighted shift to the bias."""
    scale, shift = _bn_affine(bn)
    w = layer.weight  # conv: out x in/groups x k...; linear: out x in
    groups = getattr(layer, "groups", 1)
    out_c, in_per_group = w.shape[0], w.shape[1]
    # The input channel that weight[o, j] reads is (group of o) * in_per_group + j.
    s = scale.view(groups, in_per_group).repeat_interleave(out_c // groups, 0)
    t = shift.view(groups, in_per_group).repeat_interleave(out_c // groups, 0)
    view = (out_c, in_per_group) + (1,) * (w.dim() - 2)
    w64 = w.double()
    extra = (w64 * t.view(view)).flatten(1).sum(1)
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(extra)
    _ensure_bias(layer)
    w.copy_((w64 * s.view(view)).to(w.dtype))
    layer.bias.copy_((b + extra).to(w.dtype))


def _apply(model: nn.Module, entries: list[FoldEntry], compute: bool) -> None:
    mods = dict(model.named_modules())
    for e in entries:
        if not isinstance(mods.get(e.bn), _BatchNorm):
            raise KdtoolError(f"fold plan names '{e.bn}', which is not a BatchNorm layer here")
        if e.target is not None and not hasattr(mods.get(e.target), "weight"):
            raise KdtoolError(
                f"fold plan folds '{e.bn}' into '{e.target}', which is not a conv/linear layer here"
            )
    # Input-side folds first, then output-side: the two commute, but each reads the weights.
    for action, fold in ((INTO_NEXT, _fold_after), (INTO_PREV, _fold_before)):
        for e in entries:
            if e.action == action:
                if compute:
                    fold(mods[e.target], mods[e.bn])
                else:
                    _ensure_bias(mods[e.target])
    replaced = {}
    for e in entries:
        bn = mods[e.bn]
        # A fused BN + activation keeps its activation: the BN part alone goes away.
        tail = bn_tail(bn) or []
        if e.action != AFFINE:
            replaced[id(bn)] = nn.Sequential(*tail) if tail else nn.Identity()
            continue
        affine = ChannelAffine(bn.num_features).to(bn.running_mean.device, bn.running_mean.dtype)
        if compute:
            scale, shift = _bn_affine(bn)
            with torch.no_grad():
                affine.weight.copy_(scale)
                affine.bias.copy_(shift)
        replaced[id(bn)] = nn.Sequential(affine, *tail) if tail else affine
    # Every name a BN is registered under (a shared BN can have several).
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if id(m) in replaced and name:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, replaced[id(m)])
    left = bn_layers(model)
    if left:
        raise InternalError(f"BatchNorm '{left[0][0]}' survived folding")
