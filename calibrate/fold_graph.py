"""Where each BatchNorm can be folded: found with torch.fx, or by module patterns.

A BN folds exactly into the conv/linear *before* it when that layer's output
feeds the BN alone, and into the conv/linear *after* it when the BN's output
feeds that layer alone and the layer does not pad with zeros (a padded zero
would become the BN shift after folding, so borders would change).  Anything
else stays a per-channel scale-and-shift, which is always exact.

The data flow comes from a torch.fx trace of the model.  Where a forward
cannot be traced (data-dependent control flow), that module's own forward is
traced with its composite children as black boxes and each child is traced on
its own, so an untraceable block costs only the pairs inside its own forward
(an ``nn.Sequential``, torchvision's ``Conv2dNormActivation`` included, always
traces this way).  If even that fails, the module's direct children are paired
by pattern: a conv/linear registered right before a BN is folded only once a
forward pass of an example input has shown that the BN consumes exactly that
layer's output, and the result is checked numerically (``fold.fold_bn``).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from kdtool.bn import bn_layers, bn_tail

INTO_PREV, INTO_NEXT, AFFINE = "into_prev", "into_next", "affine"
ACTIONS = (INTO_PREV, INTO_NEXT, AFFINE)
# How each decision was reached: a traced graph, named order confirmed by a forward pass, or
# nothing (no trace reached the BN).
METHODS = ("fx", "pattern", "none")
_LEAVES = (_ConvNd, nn.Linear, _BatchNorm)


@dataclass
class FoldEntry:
    """What happens to one BN: folded into ``target`` (before/after it) or kept as an affine."""

    bn: str
    action: str  # into_prev | into_next | affine
    target: str | None = None
    method: str = "fx"
    reason: str = ""  # why a BN stays an affine

    def describe(self) -> str:
        if self.action == INTO_PREV:
            return f"{self.bn} -> folded into {self.target}, the layer before it"
        if self.action == INTO_NEXT:
            return f"{self.bn} -> folded into {self.target}, the layer after it"
        return f"{self.bn} -> kept as per-channel scale-and-shift: {self.reason}"


class _Tracer(fx.Tracer):
    """Keeps conv/linear/BN (subclasses too) and the ``opaque`` children as graph leaves."""

    def __init__(self, opaque: frozenset[str] = frozenset()):
        super().__init__()
        self.opaque = opaque

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            isinstance(m, _LEAVES) or qualname in self.opaque or super().is_leaf_module(m, qualname)
        )


def _trace(scope: nn.Module, opaque: frozenset[str] = frozenset()) -> fx.Graph | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _Tracer(opaque).trace(scope)
    except Exception:  # fx fails in many ways (control flow on proxies, unsupported ops)
        return None


def _is_leaf(m: nn.Module) -> bool:
    return isinstance(m, _LEAVES) or not any(True for _ in m.children())


def foldable_before(m: nn.Module, bn: _BatchNorm) -> bool:
    """Can ``bn`` acting on ``m``'s output be folded into ``m``'s weights (output channels)?"""
    if isinstance(m, _ConvNd):
        return not m.transposed and m.out_channels == bn.num_features
    return (
        isinstance(m, nn.Linear)
        and isinstance(bn, nn.BatchNorm1d)
        and m.out_features == bn.num_features
    )


def foldable_after(m: nn.Module, bn: _BatchNorm, name: str) -> str | None:
    """None if ``bn`` feeding ``m`` folds exactly into ``m``'s input side, else why not."""
    if isinstance(m, nn.Linear):
        if isinstance(bn, nn.BatchNorm1d) and m.in_features == bn.num_features:
            return None
        return f"'{name}' (Linear) does not take the BN's channels as its features"
    if not isinstance(m, _ConvNd) or m.transposed or m.in_channels != bn.num_features:
        return f"output goes to '{name}' ({type(m).__name__}), not a conv/linear on its channels"
    if m.padding_mode != "zeros":
        return None  # reflect/replicate/circular padding commutes with a per-channel affine
    pad = m.padding
    if (
        pad == "valid"
        or (pad == "same" and all(k == 1 for k in m.kernel_size))
        or (not isinstance(pad, str) and all(p == 0 for p in pad))
    ):
        return None
    return (
        f"the next conv '{name}' pads with zeros (padding={pad}): the BN shift folded "
        "into it would be wrong at the borders"
    )


class _Analysis:
    def __init__(self, model: nn.Module, example: torch.Tensor | None):
        self.model = model
        self.example = example
        self.entries: dict[str, FoldEntry] = {}
        self._calls: dict[str, list] | None = None
        # A module registered under two names is shared: folding it would change both uses.
        counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.shared = {id(m) for m in model.modules() if counts[id(m)] > 1}

    # ------------------------------------------------------------------ traced graphs
    def scope(self, scope: nn.Module, prefix: str) -> None:
        if not any(isinstance(m, _BatchNorm) for m in scope.modules()):
            return
        graph = _trace(scope)
        if graph is not None:
            self.graph(graph, scope, prefix)
            return
        # Trace this module's own forward with its composite children as black boxes, then
        # each of those children on its own.
        children = [(n, c) for n, c in scope.named_children() if not _is_leaf(c)]
        graph = _trace(scope, frozenset(n for n, _ in children))
        if graph is not None:
            self.graph(graph, scope, prefix)
        else:
            self.pattern(scope, prefix)
        for n, c in children:
            self.scope(c, f"{prefix}{n}.")

    def graph(self, graph: fx.Graph, scope: nn.Module, prefix: str) -> None:
        mods = dict(scope.named_modules())
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        for node in graph.nodes:
            if node.op == "call_module" and isinstance(mods.get(node.target), _BatchNorm):
                self.entries[prefix + node.target] = self._decide(node, mods, calls, prefix)

    def _decide(self, node: fx.Node, mods, calls: Counter, prefix: str) -> FoldEntry:
        name, bn = prefix + node.target, mods[node.target]

        def affine(reason: str) -> FoldEntry:
            return FoldEntry(name, AFFINE, None, "fx", reason)

        if calls[node.target] > 1 or id(bn) in self.shared:
            return affine("the layer is used more than once")
        if len(node.args) != 1 or node.kwargs:
            return affine("called with extra arguments")
        src = node.args[0]
        if (
            isinstance(src, fx.Node)
            and src.op == "call_module"
            and foldable_before(mods[src.target], bn)
        ):
            prev, why_not_prev = mods[src.target], None
            if len(src.users) > 1:
                others = [self._describe(u, mods, prefix) for u in src.users if u is not node]
                why_not_prev = f"'{prefix}{src.target}' also feeds " + ", ".join(others)
            elif calls[src.target] > 1 or id(prev) in self.shared:
                why_not_prev = f"'{prefix}{src.target}' is used more than once"
            else:
                return FoldEntry(name, INTO_PREV, prefix + src.target, "fx")
        else:
            why_not_prev = f"input comes from {self._describe(src, mods, prefix)}"
        users = list(node.users)
        nxt = users[0] if len(users) == 1 else None
        tail = bn_tail(bn)
        if tail:  # the layer's own activation comes between the BN and whatever is next
            why_not_next = f"its fused activation ({type(tail[-1]).__name__}) comes next"
        elif nxt is not None and nxt.op == "call_module" and nxt.args == (node,) \
                and not nxt.kwargs:
            m = mods[nxt.target]
            why_not_next = foldable_after(m, bn, prefix + nxt.target)
            if why_not_next is None and (calls[nxt.target] > 1 or id(m) in self.shared):
                why_not_next = f"'{prefix}{nxt.target}' is used more than once"
            if why_not_next is None:
                return FoldEntry(name, INTO_NEXT, prefix + nxt.target, "fx")
        else:
            why_not_next = "output goes to " + (
                ", ".join(self._describe(u, mods, prefix) for u in users) or "nothing"
            )
        return affine(f"{why_not_prev}; {why_not_next}")

    @staticmethod
    def _describe(node, mods, prefix: str) -> str:
        if not isinstance(node, fx.Node):
            return repr(node)
        if node.op == "call_module":
            return f"'{prefix}{node.target}' ({type(mods[node.target]).__name__})"
        if node.op in ("call_function", "call_method"):
            return getattr(node.target, "__name__", str(node.target))
        return {"placeholder": "the input", "output": "the output"}.get(node.op, node.op)

    # ------------------------------------------------------------------ module patterns
    def pattern(self, scope: nn.Module, prefix: str) -> None:
        kids = list(scope.named_children())
        for i, (n, bn) in enumerate(kids):
            if not isinstance(bn, _BatchNorm):
                continue
            name = prefix + n
            if id(bn) in self.shared:
                self.entries[name] = FoldEntry(
                    name, AFFINE, None, "pattern", "the layer is used more than once"
                )
            else:
                self.entries[name] = self._named_order(
                    name, bn, kids[i - 1] if i else None, prefix, scope
                )

    def _named_order(self, name, bn, prev, prefix, scope) -> FoldEntry:
        untraced = f"the forward of '{prefix.rstrip('.') or type(scope).__name__}' cannot be traced"
        if not prev or not foldable_before(prev[1], bn) or id(prev[1]) in self.shared:
            return FoldEntry(
                name,
                AFFINE,
                None,
                "pattern",
                f"{untraced} and no conv/linear is registered right before it",
            )
        conv = prefix + prev[0]
        if self.example is None:
            return FoldEntry(
                name,
                AFFINE,
                None,
                "pattern",
                f"{untraced}; '{conv}' may feed it but no example input confirmed it",
            )
        calls = self.observed()
        if (
            len(calls.get(conv, [])) == 1
            and len(calls.get(name, [])) == 1
            and calls[name][0][0] is calls[conv][0][1]
        ):
            return FoldEntry(name, INTO_PREV, conv, "pattern")
        return FoldEntry(
            name,
            AFFINE,
            None,
            "pattern",
            f"{untraced} and a forward pass shows it does not take '{conv}''s output alone",
        )

    def observed(self) -> dict[str, list]:
        """(input, output) of every conv/linear/BN call in one eval forward of the example."""
        if self._calls is None:
            self._calls = {}
            hooks = []
            for name, m in self.model.named_modules():
                if isinstance(m, _LEAVES):

                    def hook(mod, args, output, name=name):
                        self._calls.setdefault(name, []).append((args[0] if args else None, output))

                    hooks.append(m.register_forward_hook(hook))
            training = self.model.training
            try:
                with torch.no_grad():
                    self.model.eval()(self.example)
            finally:
                self.model.train(training)
                for h in hooks:
                    h.remove()
        return self._calls


def analyse(model: nn.Module, example: torch.Tensor | None = None) -> list[FoldEntry]:
    """One ``FoldEntry`` per BN layer of ``model``, in ``model.named_modules()`` order."""
    a = _Analysis(model, example)
    a.scope(model, "")
    out = []
    for name, _ in bn_layers(model):
        out.append(
            a.entries.get(name)
            or FoldEntry(
                name, AFFINE, None, "none", "no trace of the forward pass reaches it as a module"
            )
        )
    return out
