"""Model registry and factory (timm style): ``@register_model`` + ``create_model``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kdtool.errors import KdtoolError, check_choice, message_line


@dataclass(frozen=True)
class ModelSpec:
    name: str
    fn: Callable[..., nn.Module]
    family: str
    input_size: tuple[int, int]  # expected (height, width)
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    # How images of another size are fitted to input_size by default (None: stretch;
    # F: centre crop after resizing to input_size / F; kdtool.imageprep).
    crop_fraction: float | None = None
    interpolation: str = "bilinear"
    # The normalisation its published weights use (torchvision's, timm's), the default of a
    # plain state_dict's; None: unknown, the user must say.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


_REGISTRY: dict[str, ModelSpec] = {}

TV_PREFIX = "tv:"
TIMM_PREFIX = "timm:"


def register_model(
    family: str, input_size: tuple[int, int] = (32, 32), description: str = "", tags=()
):
    """Decorator: register ``fn(num_classes=..., in_chans=..., **kw) -> nn.Module`` by its name."""

    def wrap(fn):
        name = fn.__name__
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' registered twice")
        _REGISTRY[name] = ModelSpec(name, fn, family, tuple(input_size), description, tuple(tags))
        return fn

    return wrap


def list_models(include_test: bool = True) -> list[str]:
    return sorted(n for n, s in _REGISTRY.items() if include_test or "test" not in s.tags)


def model_spec(name: str) -> ModelSpec:
    if name.startswith(TV_PREFIX):
        from kdtool.models import torchvision_models

        return torchvision_models.spec(name[len(TV_PREFIX):])
    if name.startswith(TIMM_PREFIX):
        from kdtool.models import timm_models

        return timm_models.spec(name[len(TIMM_PREFIX):])
    check_choice(name, list(_REGISTRY), "architecture")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build architecture ``name`` with random weights.

    ``name`` is a registered kdtool architecture (``kdtool models``),
    ``tv:<torchvision name>`` or ``timm:<timm name>``.
    """
    if num_classes < 1:
        raise KdtoolError(f"num_classes must be >= 1, got {num_classes}")
    if in_chans < 1:
        raise KdtoolError(f"input channels must be >= 1, got {in_chans}")
    spec = model_spec(name)
    return spec.fn(num_classes=num_classes, in_chans=in_chans, **kwargs)


def check_input_size(model: nn.Module, name: str, in_chans: int, size: tuple[int, int],
                     fix: str) -> None:
    """Raise a KdtoolError if ``model`` (architecture ``name``) cannot take
    ``in_chans x size`` images, before any work: a network that downsamples 8x8 digits
    below its kernels' size fails only at its first batch, with torch's message.

    A forward of one image that fails at ``size`` but works at the architecture's own
    input size is the input's fault; a forward that fails at both is a bug, and keeps its
    traceback. The probe runs in eval mode without gradients, so nothing of the model
    changes."""
    def forward(hw) -> None:
        device = next(iter(model.parameters()), torch.empty(0)).device
        with torch.no_grad():
            model(torch.zeros(1, in_chans, *hw, device=device))

    training = model.training
    model.eval()
    try:
        try:
            forward(size)
        except (RuntimeError, ValueError, AssertionError) as e:
            native = tuple(model_spec(name).input_size)
            if native == tuple(size):
                raise
            forward(native)  # a bug if this fails too: it raises as it is
            first = message_line(e) or type(e).__name__
            raise KdtoolError(
                f"{name} cannot take {in_chans}x{size[0]}x{size[1]} images ({first}); it "
                f"works at its own {native[0]}x{native[1]}", fix) from e
    finally:
        model.train(training)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _keep_tensor(*args, **kwargs):
    return args[0] if args else next(iter(kwargs.values()))


@contextmanager
def _weights_left_uninitialised() -> Iterator[None]:
    """Inside, ``torch.nn.init``'s in-place initialisers leave their tensor as it is.

    On the meta device they are most of a model's build time (torch runs each one's
    decomposition in Python) and their values are never read: the transformers library
    skips them the same way. Restored on exit, even after an error."""
    saved = {name: fn for name, fn in vars(nn.init).items()
             if name.endswith("_") and not name.startswith("_") and callable(fn)}
    try:
        for name in saved:
            setattr(nn.init, name, _keep_tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """Architecture ``name`` for its shapes only: on the meta device, no memory allocated and
    no initialiser run. Raises NotImplementedError for a builder that reads tensor values
    (torchvision's RegNets)."""
    with _weights_left_uninitialised(), torch.device("meta"):
        return create_model(name, **kwargs)


def architecture_params(name: str, num_classes: int = 10) -> int:
    """Parameters of architecture ``name`` with ``num_classes`` outputs and 3 input channels,
    counted without allocating or initialising weights (meta device)."""
    try:
        return count_params(build_on_meta(name, num_classes=num_classes))
    except NotImplementedError:  # a builder that reads tensor values (tv: RegNets)
        from kdtool.models.torchvision_models import published_params

        return published_params(name) or count_params(create_model(name,
                                                                   num_classes=num_classes))
